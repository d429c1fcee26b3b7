"""Hugging Face transformers adapter: `MegalodonHFConfig`, `MegalodonForCausalLM`, `MegalodonCache`.

model_type "megalodon_lm" is registered with `AutoConfig` and `AutoModelForCausalLM` as soon as transformers'
Auto classes load in a process that imported `megalodon_lm` (see `megalodon_lm.integrations`). Conversion
between run directories and transformers directories: `export_hf`, `import_hf` (see `convert`);
docs/huggingface.md has the whole tour. Names load on first use: importing this package imports nothing
from transformers yet.
"""

from __future__ import annotations

import importlib

from ..integrations import LORA_TARGET_MODULES, MODEL_TYPE

_LAZY = {
    "MegalodonCache": "cache",
    "MegalodonHFConfig": "configuration",
    "UNBOUNDED_CONTEXT": "configuration",
    "export_hf": "convert",
    "import_hf": "convert",
    "MegalodonForCausalLM": "modeling",
    "MegalodonPreTrainedModel": "modeling",
}

__all__ = ["LORA_TARGET_MODULES", "MODEL_TYPE", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
