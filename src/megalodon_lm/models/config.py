"""`MegalodonConfig`: the reference `ModelConf` fields and defaults (docs/architecture.md §6.1), validated.

Differences from the reference defaults: `vocab_size` defaults to 256 (the byte vocabulary) instead of
-1 ("fill from the tokenizer"), and `z_dim % num_heads` is really checked (the reference's check is a
no-op, see docs/paper-deviations.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INIT_MODES = ("he", "bert", "gaussian", "xavier", "none")
EFFICIENT_ATTN = (None, "swift", "fused")


@dataclass
class MegalodonConfig:
    """Megalodon model hyper-parameters. Field names follow the reference `ModelConf`.

    D = model_dim, Z = z_dim (q/k width over all heads), E = value_dim, H = num_heads,
    N = cema_ndim, C = chunk_size, G = norm_num_groups, F = ffn_hidden_dim, V = vocab_size.
    """

    num_layers: int = 8
    model_dim: int = 1024
    z_dim: int = 256
    value_dim: int = 2048
    num_heads: int = 1
    ffn_hidden_dim: int = 2048
    cema_ndim: int = 16
    chunk_size: int = 2048
    efficient_attn: str | None = None
    init_mode: str = "he"
    vocab_size: int = 256
    output_size: int = -1
    norm_num_groups: int = 32
    norm_affine: bool = True
    norm_eps: float = 1e-5
    rope_base: float | None = None
    dropout: float = 0.0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    swiglu: bool = False
    rescale_nffn: bool = False
    scale_emb: bool = False
    share_emb: bool = False
    layerwise_ckpt: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        """Per-head q/k width dz = Z / H."""
        return self.z_dim // self.num_heads

    @property
    def value_head_dim(self) -> int:
        """Per-head value width dv = E / H."""
        return self.value_dim // self.num_heads

    @property
    def effective_output_size(self) -> int:
        return self.vocab_size if self.output_size == -1 else self.output_size

    @property
    def effective_rope_base(self) -> float:
        return 10000.0 if self.rope_base is None else float(self.rope_base)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError (or TypeError) naming the first inconsistent field."""
        ints = ("num_layers", "model_dim", "z_dim", "value_dim", "num_heads", "ffn_hidden_dim",
                "cema_ndim", "chunk_size", "vocab_size", "norm_num_groups")
        for name in ints:
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"MegalodonConfig.{name} must be an int, got {type(val).__name__} {val!r}")
            if val <= 0:
                raise ValueError(f"MegalodonConfig.{name} must be positive, got {val}")
        if isinstance(self.output_size, bool) or not isinstance(self.output_size, int):
            raise TypeError(f"MegalodonConfig.output_size must be an int, got {self.output_size!r}")
        if self.output_size != -1 and self.output_size <= 0:
            raise ValueError(
                f"MegalodonConfig.output_size must be -1 (= vocab_size) or positive, got {self.output_size}"
            )
        if self.z_dim % self.num_heads:
            raise ValueError(f"z_dim ({self.z_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.value_dim % self.num_heads:
            raise ValueError(f"value_dim ({self.value_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"z_dim / num_heads = {self.head_dim} must be even for rotary embeddings")
        if self.model_dim % self.norm_num_groups:
            raise ValueError(
                f"model_dim ({self.model_dim}) must be divisible by norm_num_groups ({self.norm_num_groups})"
            )
        if self.share_emb and self.effective_output_size != self.vocab_size:
            raise ValueError("share_emb=True needs output_size == vocab_size (the output reuses the embedding)")
        for name in ("dropout", "hidden_dropout", "attention_dropout"):
            val = getattr(self, name)
            if not isinstance(val, (int, float)) or not 0.0 <= float(val) < 1.0:
                raise ValueError(f"MegalodonConfig.{name} must be in [0, 1), got {val!r}")
        if not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"MegalodonConfig.norm_eps must be positive, got {self.norm_eps!r}")
        if self.rope_base is not None and (not isinstance(self.rope_base, (int, float)) or self.rope_base <= 1):
            raise ValueError(f"MegalodonConfig.rope_base must be None or > 1, got {self.rope_base!r}")
        if self.init_mode not in INIT_MODES:
            raise ValueError(f"MegalodonConfig.init_mode must be one of {INIT_MODES}, got {self.init_mode!r}")
        if self.efficient_attn not in EFFICIENT_ATTN:
            raise ValueError(
                f"MegalodonConfig.efficient_attn must be one of {EFFICIENT_ATTN}, got {self.efficient_attn!r}"
            )
        for name in ("norm_affine", "swiglu", "rescale_nffn", "scale_emb", "share_emb", "layerwise_ckpt"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MegalodonConfig.{name} must be a bool, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the reference field names (JSON-serialisable)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MegalodonConfig:
        """Inverse of `to_dict`. Unknown keys are an error (they usually mean a typo)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MegalodonConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of the config; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> MegalodonConfig:
        """From JSON text or from a path to a JSON file."""
        src = str(text_or_path)
        if not src.lstrip().startswith("{"):
            src = Path(src).read_text()
        return cls.from_dict(json.loads(src))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MegalodonConfig:
        """A named preset (see `PRESETS`), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def num_parameters(self) -> int:
        """Parameter count from the formulas of docs/architecture.md §1.7 (buffers excluded)."""
        D, Z, E, F, N, V = (self.model_dim, self.z_dim, self.value_dim, self.ffn_hidden_dim,
                            self.cema_ndim, self.vocab_size)
        affine = D if self.norm_affine else 0
        mega = 2 * D + D * N * 4 + 2 * D + affine  # timenorm, cema (alpha, delta, gamma x2), theta+omega, rmsnorm
        mega += (E * D + E) * 2 + (Z * D + Z) + (D * D + D) + D * E + 4 * Z
        ffn = (2 * D if self.norm_affine else 0) + F * D * (3 if self.swiglu else 2) + (D if self.rescale_nffn else 0)
        out = 0 if self.share_emb else self.effective_output_size * D
        return V * D + self.num_layers * (mega + ffn) + 2 * D + out


# Presets. `tiny` is our CPU benchmark shape; 200M/1.3B are the reference's mega200M/mega1.3B;
# 7B is the paper's 7B (mega7.3B with chunk 4096 and RoPE base 1e5). `nano` is a seconds-fast demo.
# `3M` (the JAX port's shape: 1 head, SwiGLU) is the default of `megalodon-lm train`: it learns visibly within
# minutes on a CPU and reached a lower BPB than `mini` (~3.7M, 2 heads, SiLU FFN) on the same tokens
# (docs/results.md, preset comparison).
PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(num_layers=2, model_dim=128, z_dim=64, value_dim=256, num_heads=2, ffn_hidden_dim=256,
                 cema_ndim=16, chunk_size=64, norm_num_groups=16, vocab_size=256),
    "mini": dict(num_layers=4, model_dim=256, z_dim=64, value_dim=512, num_heads=2, ffn_hidden_dim=768,
                 cema_ndim=16, chunk_size=128, norm_num_groups=16, vocab_size=256),
    "3M": dict(num_layers=4, model_dim=256, z_dim=128, value_dim=512, num_heads=1, ffn_hidden_dim=364, swiglu=True,
               cema_ndim=16, chunk_size=128, norm_num_groups=32, vocab_size=256),
    "tiny": dict(num_layers=6, model_dim=384, z_dim=128, value_dim=768, num_heads=2, ffn_hidden_dim=1024,
                 cema_ndim=16, chunk_size=256, norm_num_groups=32, vocab_size=256),
    # 3M's choices at tiny's width and depth (one head, z = d / 2, SwiGLU narrowed to keep the parameter count):
    # lower BPB than `tiny` on the same tokens (docs/results.md, preset comparison)
    "11M": dict(num_layers=6, model_dim=384, z_dim=192, value_dim=768, num_heads=1, ffn_hidden_dim=640, swiglu=True,
                cema_ndim=16, chunk_size=256, norm_num_groups=32, vocab_size=256),
    "200M": dict(num_layers=12, model_dim=1024, z_dim=256, value_dim=2048, num_heads=1, ffn_hidden_dim=2560,
                 cema_ndim=16, chunk_size=2048, norm_num_groups=32, vocab_size=32000),
    "1.3B": dict(num_layers=24, model_dim=2048, z_dim=512, value_dim=4096, num_heads=2, ffn_hidden_dim=4864,
                 cema_ndim=16, chunk_size=2048, norm_num_groups=64, vocab_size=32000),
    "7B": dict(num_layers=32, model_dim=4096, z_dim=1024, value_dim=8192, num_heads=4, ffn_hidden_dim=8192,
               swiglu=True, cema_ndim=16, chunk_size=4096, norm_num_groups=64, rope_base=1e5, vocab_size=32000),
}
