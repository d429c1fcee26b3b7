"""Hugging Face transformers adapter: `MegalodonHFConfig`, `MegalodonForCausalLM`, `MegalodonCache`.

Importing this package registers model_type "megalodon_lm" with `AutoConfig` and `AutoModelForCausalLM`,
so `AutoModelForCausalLM.from_pretrained(local_dir)` works after `import megalodon_lm.hf`. Conversion
between run directories and transformers directories: `export_hf`, `import_hf` (see `convert`).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import MegalodonCache
from .configuration import MODEL_TYPE, MegalodonHFConfig
from .convert import export_hf, import_hf
from .modeling import MegalodonForCausalLM, MegalodonPreTrainedModel

AutoConfig.register(MODEL_TYPE, MegalodonHFConfig, exist_ok=True)
AutoModelForCausalLM.register(MegalodonHFConfig, MegalodonForCausalLM, exist_ok=True)

__all__ = [
    "MODEL_TYPE",
    "MegalodonCache",
    "MegalodonForCausalLM",
    "MegalodonHFConfig",
    "MegalodonPreTrainedModel",
    "export_hf",
    "import_hf",
]
