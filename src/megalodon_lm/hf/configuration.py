"""`MegalodonHFConfig`: a transformers `PreTrainedConfig` holding every `MegalodonConfig` field.

`model_type` is "megalodon_lm" (not "megalodon") so that it cannot collide with a future upstream model.
`tie_word_embeddings` mirrors `share_emb` (set one, or both to the same value). `max_position_embeddings` is
`UNBOUNDED_CONTEXT` (2**31 - 1): the streaming state has a fixed size, so no context length is a limit, and
tools that size their windows by this attribute (lm-eval's `hf` model, pipelines) must not cut at 2048.
`save_pretrained` also writes the `auto_map` and the loader files of `remote_code`, so a saved folder loads
with `trust_remote_code=True` in an interpreter that never imported megalodon_lm.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from transformers import PreTrainedConfig

from ..integrations import MODEL_TYPE
from ..models.config import MegalodonConfig
from .remote_code import AUTO_MAP, write_loader_files

UNBOUNDED_CONTEXT = 2**31 - 1  # the largest int32: any tool can store it
_FIELDS = tuple(f.name for f in dataclasses.fields(MegalodonConfig))


class MegalodonHFConfig(PreTrainedConfig):
    """Hugging Face config for `MegalodonForCausalLM`; field names and defaults are `MegalodonConfig`'s."""

    model_type = MODEL_TYPE
    attribute_map = {
        "hidden_size": "model_dim",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "intermediate_size": "ffn_hidden_dim",
    }

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
    # standard transformers fields
    max_position_embeddings: int = UNBOUNDED_CONTEXT
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = self.share_emb
        elif bool(self.tie_word_embeddings) != bool(self.share_emb):
            raise ValueError(f"tie_word_embeddings={self.tie_word_embeddings} contradicts share_emb={self.share_emb}: "
                             "they mean the same thing here (set share_emb)")
        super().__post_init__(**kwargs)
        self.to_megalodon_config()  # validates the Megalodon fields (ValueError/TypeError naming the field)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """config.json with the `auto_map`, plus the loader files it names (remote_code.py)."""
        self.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        write_loader_files(save_directory)

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoConfig") -> None:
        """A no-op: transformers calls it after loading through `auto_map`, and it would then copy this module
        (not the loader file) into every folder saved later. `save_pretrained` writes the `auto_map` itself."""
        return None

    def to_megalodon_config(self) -> MegalodonConfig:
        """The library config these fields describe."""
        return MegalodonConfig.from_dict({name: getattr(self, name) for name in _FIELDS})

    @classmethod
    def from_megalodon_config(cls, config: MegalodonConfig, **hf_kwargs: Any) -> MegalodonHFConfig:
        """From a `MegalodonConfig`, plus standard transformers fields (eos_token_id=..., ...)."""
        if not isinstance(config, MegalodonConfig):
            raise TypeError(f"expected a MegalodonConfig, got {type(config).__name__}")
        return cls(**config.to_dict(), **hf_kwargs)
