"""lm-evaluation-harness model "megalodon": a run directory or an exported transformers folder.

    import lm_eval
    lm_eval.simple_evaluate(model="megalodon", model_args="pretrained=RUN_DIR,batch_size=8", tasks=[...])

(After `import megalodon_lm` the name is registered with lm-eval lazily; importing this module registers it
too.) Nothing is truncated: a context of any length is streamed through the constant-size state.

- loglikelihood: batches of (context, continuation) sorted by length, right-padded, scored by
  `score_rows` (evals/stream_score.py); an empty context is the EOS token (lm-eval's prefix token).
- loglikelihood_rolling: each whole document streamed after EOS, every token scored once: the sum of
  log p(x_t | EOS, x_0..x_{t-1}), lm-eval's rolling convention with a window as long as the document.
- generate_until: batches of requests with the same generation arguments, through `stream_generate`
  (greedy unless do_sample; temperature, top_k, top_p, repetition_penalty honoured), stopping a row at EOS or
  at the first stop string, which is cut off the returned text.

model_args: pretrained (path, required), step (run checkpoint, default latest), device ("cpu"), batch_size (1),
piece_tokens (columns per forward, 2048: bounds memory at batch x piece x vocab logits), max_gen_toks (256).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from ..generation.decoding import stream_generate
from ..integrations import LM_EVAL_MODEL_NAME
from .stream_score import score_rows

log = logging.getLogger(__name__)
_SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty")


def _int_arg(name: str, value: Any, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i:i + size]) for i in range(0, len(order), size)]


@register_model(LM_EVAL_MODEL_NAME)
class MegalodonEvalLM(TemplateLM):
    """lm-eval `LM` over a `MegalodonLM` and its tokenizer (byte-level or BPE)."""

    def __init__(self, pretrained: str, step: int | str | None = None, device: str = "cpu",
                 batch_size: int | str = 1, piece_tokens: int | str = 2048, max_gen_toks: int | str = 256,
                 **unused: Any) -> None:
        super().__init__()
        from ..hf.convert import load_model_dir  # lazy: transformers only for a transformers folder

        if unused:  # lm-eval passes its generic options (max_batch_size, ...) to every model
            log.info("megalodon model ignores %s", sorted(unused))
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size 'auto' is not supported by the megalodon model: give a number")
        self.batch_size = _int_arg("batch_size", batch_size)
        self.piece_tokens = _int_arg("piece_tokens", piece_tokens)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)
        self._device = torch.device(device)
        self.model, self.tokenizer = load_model_dir(pretrained, device=self._device,
                                                    step=None if step is None else _int_arg("step", step, 0))
        self.pretrained = str(pretrained)

    # ------------------------------------------------------------------ tokenizer facts lm-eval asks for
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def max_length(self) -> int:
        from ..hf.configuration import UNBOUNDED_CONTEXT

        return UNBOUNDED_CONTEXT

    @property
    def tokenizer_name(self) -> str:
        return f"megalodon-{self.tokenizer.kind}-{self.tokenizer.fingerprint()[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring
    def _score(self, rows: list[list[int]], n_scored: list[int], desc: str, disable_tqdm: bool) -> list[Any]:
        """`score_rows` over length-sorted batches; results in the input order."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        results: list[Any] = [None] * len(rows)
        for batch in tqdm(_batches(order, self.batch_size), desc=desc, disable=disable_tqdm):
            scores = score_rows(self.model, [rows[i] for i in batch], [n_scored[i] for i in batch],
                                self.piece_tokens)
            for i, s in zip(batch, scores, strict=True):
                results[i] = s
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        rows = [list(ctx) + list(cont) for _, ctx, cont in requests]
        n = [len(cont) for _, _, cont in requests]
        out = []
        for (key, _, _), s in zip(requests, self._score(rows, n, "loglikelihood", disable_tqdm), strict=True):
            answer = (s.logprob, s.is_greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, n = [], []
        for req in requests:
            tokens = self.tok_encode(req.args[0])
            rows.append([self.prefix_token_id, *tokens])
            n.append(len(tokens))
        out = []
        for req, s in zip(requests, self._score(rows, n, "loglikelihood_rolling", disable_tqdm), strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, s.logprob)
            out.append(s.logprob)
        return out

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        results: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            for batch in _batches(indices, self.batch_size):
                texts = self._generate_batch([requests[i].args[0] for i in batch], dict(kwargs))
                for i, text in zip(batch, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    def _generate_batch(self, contexts: list[str], kwargs: dict[str, Any]) -> list[str]:
        """Continuations of `contexts`, each cut at its first stop string (EOS always stops a row)."""
        until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
        max_new = kwargs.pop("max_gen_toks")
        sampling = {k: kwargs.pop(k) for k in _SAMPLING if k in kwargs}
        if not kwargs.pop("do_sample", False):
            sampling["temperature"] = 0.0
        if kwargs:
            log.warning("megalodon model ignores generation arguments %s", sorted(kwargs))
        prompts = [self.tok_encode(c) or [self.prefix_token_id] for c in contexts]
        eos = self.eot_token_id
        generated: list[list[int]] = [[] for _ in prompts]
        stopped = [False] * len(prompts)
        steps = stream_generate(self.model, prompts, max_new_tokens=max_new, eos_token_id=eos, **sampling)
        for tokens in steps:
            for row, t in enumerate(tokens.tolist()):
                if stopped[row]:
                    continue
                if t == eos:
                    stopped[row] = True
                    continue
                generated[row].append(t)
                stopped[row] = _has_stop(self.tok_decode, generated[row], until)
            if all(stopped):
                break
        return [_cut(self.tok_decode(g), until) for g in generated]


def _has_stop(decode: Callable[[Sequence[int]], str], tokens: list[int], until: list[str]) -> bool:
    # Only the tail can hold a new match: decode the last tokens, enough for the longest stop string.
    if not until:
        return False
    tail = decode(tokens[-(max(len(s) for s in until) * 4 + 4):])
    return any(s in tail for s in until)


def _cut(text: str, until: list[str]) -> str:
    for s in until:
        if s:
            text = text.split(s, 1)[0]
    return text
