"""`MegalodonForCausalLM`: a transformers `PreTrainedModel` whose submodule `model` is a `MegalodonLM`.

Parameter names are the library's under the prefix `model.`, so `model.model.state_dict()` is exactly a
run-directory checkpoint. Incremental decoding goes through `MegalodonCache` (the exact streaming state).

Padding: `MegalodonLM` streams support right padding only (a row's pads are skipped by its stream). Left
padding, the usual transformers convention for batched `generate`, is refused with a ValueError; generate
unpadded prompts (or one prompt at a time).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models.megalodon import MegalodonLM
from .cache import MegalodonCache
from .configuration import MegalodonHFConfig


class MegalodonPreTrainedModel(PreTrainedModel):
    config_class = MegalodonHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MegaBlock"]

    def _init_weights(self, module: torch.nn.Module) -> None:
        # MegalodonLM initialises itself (reference init) in its constructor; from_pretrained loads every tensor.
        return None


class MegalodonForCausalLM(MegalodonPreTrainedModel, GenerationMixin):
    """Causal LM head model. forward(input_ids, attention_mask, past_key_values/cache, labels, use_cache)."""

    def __init__(self, config: MegalodonHFConfig) -> None:
        super().__init__(config)
        self.model = MegalodonLM(config.to_megalodon_config())
        self.post_init()

    # ------------------------------------------------------------------ transformers plumbing
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward creates a MegalodonCache itself

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.model.output.output

    @property
    def megalodon_config(self):
        return self.model.config

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _segment_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """The mask columns of this segment (transformers passes past + current), None when all real."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D, got shape {tuple(attention_mask.shape)}")
        valid = attention_mask != 0
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError("attention_mask has padding before real tokens (left padding): Megalodon streams "
                             "support right padding only; generate unpadded prompts or one prompt at a time")
        seg = attention_mask[:, -length:]
        return None if bool((seg != 0).all()) else seg

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = True,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """labels (B, L) are shifted inside (token t predicts labels[t + 1]); -100 is ignored.

        past_key_values / cache: a `MegalodonCache` (updated in place and returned), or None / an empty
        transformers cache (a fresh `MegalodonCache` is used when use_cache). logits_to_keep=k > 0 returns
        only the last k positions' logits.
        """
        if inputs_embeds is not None:
            raise ValueError("MegalodonForCausalLM takes input_ids only (inputs_embeds is not supported)")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass either cache or past_key_values, not both")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = bool(getattr(self.config, "use_cache", True)) and not (self.training and labels is not None)
        if cache is not None and not isinstance(cache, MegalodonCache):
            if isinstance(cache, Cache) and cache.get_seq_length() == 0:
                cache = None
            else:
                raise TypeError(f"MegalodonForCausalLM needs a MegalodonCache, got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = MegalodonCache()
        state = None if cache is None else cache.state

        B, L = input_ids.shape
        mask = self._segment_mask(attention_mask, L)
        last_only = logits_to_keep == 1 and labels is None and mask is None
        out = self.model(input_ids, state=state, return_state=cache is not None, attention_mask=mask,
                         last_logits_only=last_only)
        logits = out.logits
        if cache is not None:
            cache.state = out.state

        loss = None
        if labels is not None:
            loss = self._loss(logits, labels, mask, kwargs.get("num_items_in_batch"))
        if logits_to_keep and not last_only:
            logits = logits[:, -logits_to_keep:]
        output = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
        return output if return_dict is None or return_dict else output.to_tuple()

    @staticmethod
    def _loss(logits, labels, mask, num_items_in_batch) -> torch.Tensor:
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
        labels = labels.to(logits.device)
        if mask is not None:
            labels = labels.masked_fill(mask.to(labels.device) == 0, -100)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        flat = logits.reshape(-1, logits.shape[-1])
        if num_items_in_batch is None:
            return F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100)
        total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="sum")
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
