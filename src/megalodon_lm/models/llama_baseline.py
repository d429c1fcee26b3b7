"""The Llama-architecture baseline: HF `LlamaForCausalLM` (SDPA attention) matched to a Megalodon config.

`llama_config_for(mcfg, max_positions)` keeps Megalodon's width, depth and vocabulary and fits the MLP width so
that the parameter count is within +-5% of `mcfg.num_parameters()`. `LlamaLM` wraps the HF model behind the
`MegalodonLM` call convention (aligned targets, `.logits`, `state` = a KV cache), so the trainer, `evaluate` and
the BPB-vs-context harness run either architecture. `transformers` is imported lazily (the `hf` extra).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MegalodonConfig
from .megalodon import MegalodonLM, MegalodonOutput

ARCHS = ("megalodon", "llama")
LLAMA_CONFIG_FILE = "llama_config.json"  # in a run directory: its presence marks a Llama run
PARAM_TOLERANCE = 0.05
HEAD_DIM = 64


def require_transformers() -> Any:
    """The `transformers` module, or an ImportError saying how to install it."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is installed in the dev environment
        raise ImportError("the Llama baseline needs Hugging Face transformers: pip install 'megalodon-lm[hf]'") from exc
    return transformers


def llama_num_parameters(hidden: int, inter: int, layers: int, vocab: int, tied: bool = False) -> int:
    """Parameters of a LlamaForCausalLM with full multi-head attention (n_kv_heads = n_heads), no biases."""
    # per layer: q, k, v, o (h x h each), gate/up/down (h x I each), two RMSNorm weights; final norm; embeddings
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    return layers * per_layer + hidden + vocab * hidden * (1 if tied else 2)


def llama_config_for(mcfg: MegalodonConfig, max_positions: int, target_params: int | None = None) -> Any:
    """LlamaConfig with Megalodon's width/depth/vocab and an MLP width fitted to `target_params` (+-5%).

    target_params defaults to `mcfg.num_parameters()`. Raises ValueError when no MLP width gets within 5%
    (a Megalodon config whose attention/embedding share alone exceeds the target).
    """
    transformers = require_transformers()
    if max_positions < 1:
        raise ValueError(f"max_positions must be positive, got {max_positions}")
    target = mcfg.num_parameters() if target_params is None else int(target_params)
    h, n_layers, vocab, tied = mcfg.model_dim, mcfg.num_layers, mcfg.vocab_size, mcfg.share_emb
    heads = max(1, h // HEAD_DIM)
    if h % heads:
        raise ValueError(f"model_dim {h} is not divisible into heads of {HEAD_DIM}")
    fixed = llama_num_parameters(h, 0, n_layers, vocab, tied)
    inter = max(8, round((target - fixed) / (3 * h * n_layers) / 8) * 8)  # a multiple of 8, as HF configs use
    got = llama_num_parameters(h, inter, n_layers, vocab, tied)
    if abs(got / target - 1) > PARAM_TOLERANCE:
        raise ValueError(f"no Llama MLP width matches {target:,} parameters within 5% (closest: {got:,} with "
                         f"intermediate_size {inter}); change the Megalodon config")
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        tie_word_embeddings=tied, attention_dropout=0.0, attn_implementation="sdpa")


class LlamaLM(nn.Module):
    """`LlamaForCausalLM` (SDPA) behind MegalodonLM's forward: targets aligned with the logits, state = KV cache.

    `model(input_ids, targets=None, state=None, return_state=False, attention_mask=None, last_logits_only=False)`
    returns a `MegalodonOutput` with logits (B, L, V) float32; `state` is a transformers DynamicCache holding every
    past position (full attention over the prefix, unlike Megalodon's chunk-local attention plus CEMA).
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        transformers = require_transformers()
        self.hf = transformers.LlamaForCausalLM(config)
        impl = self.hf.config._attn_implementation
        if impl != "sdpa":
            raise RuntimeError(f"Llama built with attn_implementation={impl!r}, expected 'sdpa'")
        self.config = self.hf.config
        params = inspect.signature(self.hf.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x: `cache`

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, state: Any = None,
                return_state: bool = False, attention_mask: torch.Tensor | None = None, *,
                last_logits_only: bool = False) -> MegalodonOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        if last_logits_only and targets is not None:
            raise ValueError("last_logits_only=True computes no loss: pass targets=None")
        if last_logits_only and attention_mask is not None:
            raise ValueError("last_logits_only=True is supported without padding only")
        need_state = return_state or state is not None
        if need_state and state is None:
            state = require_transformers().DynamicCache(config=self.config)
        kwargs = {self._cache_kwarg: state} if need_state else {}
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=need_state,
                      logits_to_keep=1 if last_logits_only else 0, **kwargs)
        logits = out.logits.float()
        loss = None
        if targets is not None:
            tgt = targets if attention_mask is None else targets.masked_fill(attention_mask == 0, -100)
            loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
        new_state = (out.get("cache") or out.get("past_key_values")) if need_state else None
        return MegalodonOutput(logits=logits, loss=loss, state=new_state)

    @torch.no_grad()
    def sample(self, ids: list[int], max_new_tokens: int, eos_id: int | None, seed: int = 0) -> list[int]:
        """Sampled continuation (temperature 0.8, top-k 40, as the Megalodon end-of-training sample)."""
        was_training = self.training
        self.eval()
        torch.manual_seed(seed)
        x = torch.tensor([ids], device=self.hf.device)
        out = self.hf.generate(x, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=40,
                               eos_token_id=eos_id, pad_token_id=eos_id)
        self.train(was_training)
        return out[0, len(ids):].tolist()


# ---------------------------------------------------------------------- run directories
def _saved_llama_config(run_dir: Path) -> Any:
    cfg = require_transformers().LlamaConfig.from_dict(json.loads((run_dir / LLAMA_CONFIG_FILE).read_text()))
    cfg._attn_implementation = "sdpa"  # not part of the serialised config
    return cfg


def run_arch(run_dir: str | Path) -> str:
    """"llama" when the run directory holds a Llama config, else "megalodon"."""
    return "llama" if (Path(run_dir) / LLAMA_CONFIG_FILE).is_file() else "megalodon"


def arch_config(arch: str, mcfg: MegalodonConfig, seq_len: int, source_dir: str | Path | None = None) -> Any:
    """The LlamaConfig of an `arch` run (None for Megalodon); ValueError for a bad arch or source.

    With `source_dir` (resume / init-from) the Llama config saved there is used, and the source's architecture
    must equal `arch`. Cheap: the trainer calls it before writing anything.
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if source_dir is not None and run_arch(source_dir) != arch:
        raise ValueError(f"--arch {arch} differs from the architecture of {source_dir} ({run_arch(source_dir)})")
    if arch == "megalodon":
        return None
    return _saved_llama_config(Path(source_dir)) if source_dir is not None else llama_config_for(mcfg, seq_len)


def build_model(arch: str, mcfg: MegalodonConfig, seq_len: int, source_dir: str | Path | None = None) -> nn.Module:
    """A fresh MegalodonLM or matched LlamaLM (call after seeding); arguments as `arch_config`."""
    lcfg = arch_config(arch, mcfg, seq_len, source_dir)
    return MegalodonLM(mcfg) if lcfg is None else LlamaLM(lcfg)


def save_arch(run_dir: str | Path, model: nn.Module) -> None:
    """Record a Llama run's HF config next to model_config.json (a Megalodon run writes nothing)."""
    if isinstance(model, LlamaLM):
        (Path(run_dir) / LLAMA_CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True,
                                                                  default=str) + "\n")


def model_from_run_dir(run_dir: str | Path, mcfg: MegalodonConfig) -> nn.Module:
    """An uninitialised-weights model of the run's architecture (Megalodon, or the saved Llama config)."""
    return LlamaLM(_saved_llama_config(Path(run_dir))) if run_arch(run_dir) == "llama" else MegalodonLM(mcfg)


def sample_llama_text(model: LlamaLM, tokenizer: Any, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """The Llama counterpart of trainer.sample_text."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    new = model.sample(ids, max_new_tokens, tokenizer.eos_id, seed)
    return prompt + tokenizer.decode([t for t in new if t != tokenizer.eos_id])
