"""`MegalodonForCausalLM`: a transformers `PreTrainedModel` whose submodule `model` is a `MegalodonLM`.

Parameter names are the library's under the prefix `model.`, so `model.model.state_dict()` is exactly a
run-directory checkpoint. Incremental decoding goes through `MegalodonCache` (the exact streaming state).

Padding: attention_mask zeros may sit anywhere (left padding, transformers' convention for batched
`generate`, or right padding for training): each row's stream consumes its real tokens and skips the pads
(hf/padding.py), so a padded row gives what it gives alone. Logits and hidden states at pads are 0.

Also: `attn_implementation` "eager" and "sdpa" are both accepted and change nothing (attention always runs
the library's chunked kernels on `scaled_dot_product_attention`); `position_ids` are ignored (positions come
from each row's stream); `output_hidden_states` gives (input of block 0, outputs of blocks 0..n-2, final
norm of block n-1's output), the same layout as Llama's; `lora_target_modules` is PEFT's default target list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..integrations import LORA_TARGET_MODULES
from ..models.megalodon import MegalodonLM
from .cache import MegalodonCache
from .configuration import MegalodonHFConfig
from .padding import left_align_order, real_tokens, restore


class MegalodonPreTrainedModel(PreTrainedModel):
    config_class = MegalodonHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MegaBlock"]
    _supports_sdpa = True  # attention is always our chunked SDPA: "sdpa" and "eager" both mean that

    def _init_weights(self, module: torch.nn.Module) -> None:
        # MegalodonLM initialises itself (reference init) in its constructor; from_pretrained loads every tensor.
        return None

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoModel") -> None:
        """A no-op, as `MegalodonHFConfig.register_for_auto_class` (the config writes the `auto_map`)."""
        return None


@contextmanager
def _hidden_states(lm: MegalodonLM, enabled: bool) -> Iterator[list[torch.Tensor]]:
    """Collects the hidden states of one forward into the yielded list (filled when the block exits).

    Hooks, not a model change: the library's forward stays as it is. They are removed before any backward,
    so gradient checkpointing's recomputation adds nothing.
    """
    states: list[torch.Tensor] = []
    if not enabled:
        yield states
        return
    n = len(lm.layers)
    seen: dict[int, torch.Tensor] = {}
    handles = [lm.layers[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__(0, args[0]))]
    for i, block in enumerate(lm.layers):
        handles.append(block.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i + 1, out[0])))
    # Runs after the last block: its entry becomes the final norm's output, as in Llama.
    handles.append(lm.output.final_norm.register_forward_hook(lambda _m, _a, out: seen.__setitem__(n, out[0])))
    try:
        yield states
    finally:
        for h in handles:
            h.remove()
    states.extend(seen[i] for i in range(n + 1))


class MegalodonForCausalLM(MegalodonPreTrainedModel, GenerationMixin):
    """Causal LM head model. forward(input_ids, attention_mask, past_key_values/cache, labels, use_cache)."""

    lora_target_modules: tuple[str, ...] = LORA_TARGET_MODULES

    def __init__(self, config: MegalodonHFConfig) -> None:
        super().__init__(config)
        self.model = MegalodonLM(config.to_megalodon_config())
        self.post_init()

    # ------------------------------------------------------------------ transformers plumbing
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # never a DynamicCache: ours is a MegalodonCache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args: Any, **kwargs: Any):
        # transformers creates no cache for us (it warns about a cache_implementation); an empty
        # MegalodonCache before the first forward lets chunked prefill (`prefill_chunk_size`) work.
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is not False and model_kwargs.get("cache") is None \
                and model_kwargs.get("past_key_values") is None:
            model_kwargs["cache"] = MegalodonCache()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module | None:
        """The output projection; None when tied (share_emb), the logits then use the input embedding."""
        return self.model.output.output

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        if self.model.output.output is None:
            raise ValueError("this model ties its output projection to the input embedding (share_emb): "
                             "set the input embedding instead")
        self.model.output.output = value

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> torch.nn.Embedding:
        """transformers' resize, then the library config follows (its vocab_size checks the input ids)."""
        embed = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        vocab = self.model.embed.num_embeddings
        head = self.model.output.output
        output_size = -1 if head is None or head.out_features == vocab else head.out_features
        self.model.config = dataclasses.replace(self.model.config, vocab_size=vocab, output_size=output_size)
        self.config.vocab_size, self.config.output_size = vocab, output_size
        return embed

    @property
    def megalodon_config(self):
        return self.model.config

    # ------------------------------------------------------------------ forward
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
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """labels (B, L) are shifted inside (token t predicts the next real token's label); -100 is ignored.

        attention_mask: (B, L), or (B, past + L) as `generate` passes it; 0 = pad, anywhere in a row.
        past_key_values / cache: a `MegalodonCache` (updated in place and returned), or None / an empty
        transformers cache (a fresh `MegalodonCache` is used when use_cache). logits_to_keep=k > 0 returns
        only the last k positions' logits. position_ids and other extra keywords are ignored.
        """
        if inputs_embeds is not None:
            raise ValueError("MegalodonForCausalLM takes input_ids only (inputs_embeds is not supported)")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported: attention covers one chunk at a time and the "
                             "longer context is carried by CEMA, so no attention matrix spans the input")
        cache = self._resolve_cache(cache, past_key_values, use_cache, labels)
        state = None if cache is None else cache.state
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))

        B, L = input_ids.shape
        valid = real_tokens(attention_mask, L)
        order = None if valid is None else left_align_order(valid)
        ids, seg_valid, seg_labels = input_ids, valid, labels
        if order is not None:  # real tokens first: MegalodonLM streams skip right padding
            ids, seg_valid = input_ids.gather(1, order), valid.gather(1, order)
            seg_labels = None if labels is None else labels.to(order.device).gather(1, order)
        # Each row's last real token is the last column's token when that column is real in every row.
        last_only = (logits_to_keep == 1 and labels is None and not output_hidden_states
                     and (valid is None or bool(valid[:, -1].all())))
        with _hidden_states(self.model, output_hidden_states) as hidden:
            out = self.model(ids, state=state, return_state=cache is not None, attention_mask=seg_valid,
                             last_logits_only=last_only)
        if cache is not None:
            cache.update(out.state, L)

        loss = None
        if labels is not None:
            loss = self._loss(out.logits, seg_labels, seg_valid, kwargs.get("num_items_in_batch"))
        logits = out.logits
        if not last_only:
            logits = restore(logits, order, valid)
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        hidden_states = tuple(restore(h, order, valid) for h in hidden) if output_hidden_states else None
        output = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache is not False else None,
                                        hidden_states=hidden_states)
        return output if return_dict is None or return_dict else output.to_tuple()

    def _resolve_cache(self, cache, past_key_values, use_cache, labels) -> MegalodonCache | None:
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
        return cache

    @staticmethod
    def _loss(logits, labels, valid, num_items_in_batch) -> torch.Tensor:
        """Next-token loss over left-aligned rows: position t predicts labels[t + 1], pads ignored."""
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
        labels = labels.to(logits.device)
        if valid is not None:
            labels = labels.masked_fill(~valid.to(labels.device), -100)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        flat = logits.reshape(-1, logits.shape[-1])
        if num_items_in_batch is None:
            return F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100)
        total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="sum")
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
