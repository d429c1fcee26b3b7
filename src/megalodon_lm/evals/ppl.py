"""Bits per byte (BPB) vs context length, with the same scored tokens at every context length.

Scoring rule (docs/evaluation.md §3). A document is tokenized without BOS/EOS into tokens x_0..x_{n-1}. Its
scored region is its last `min(score_tokens, n - 1)` tokens (x_0 is never scored: nothing predicts it), so a
short document scores what exists, and the region depends only on the document, never on the context length.

What "context c" means. The scored region is cut into blocks of b = max(1, c // 2) targets. The block of
targets x_{t0}..x_{t1-1} is predicted from one window of inputs starting at w = max(0, t1 - 1 - c), so
target x_t is predicted from tokens x_w..x_{t-1}: at most c and at least c - b + 1 (>= c/2) tokens, fewer only
where the document starts closer. A context >= the document length therefore is the whole prefix.

`None` = whole prefix: the document is streamed from x_0 with the model state carried (CEMA, TimestepNorm
statistics, partial attention chunk), `piece_tokens` per forward; unscored pieces project no logits, so memory
does not grow with the document. With `refresh=True` the reference's TimestepNorm statistics refresh
(docs/architecture.md §7.2) is applied: 2-chunk pieces, and after a piece ending at token e >= 8 chunks (with more
tokens left) the norm statistics are recomputed by a fresh run over the last 6 chunks and swapped in.

Reset ablation (`resets`, `reset_every`): the whole-prefix stream again, with chosen memory paths reset to
their initial values at every multiple of `reset_every` tokens from the document start: "cema" (every layer's
CEMA hidden state), "norm" (every TimestepNorm's running statistics), "both", or "none" (the stream is cut at
the same boundaries but nothing is reset: equal to the plain whole prefix). The scored tokens are the same,
so carried minus reset BPB is what that memory path contributes. With `reset_every` a multiple of the
attention chunk, "both" equals scoring independent `reset_every`-token segments (attention is chunk-local).

BPB = sum NLL (nats) / ln 2 / sum of the scored tokens' byte lengths (`tokenizer.token_byte_lengths()`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.sources import iter_documents, resolve_sources
from ..models.megalodon import MegalodonLM
from ..models.state import StreamState

REFRESH_MIN_CHUNKS = 8  # reference TRUNCATE_CHUNKS: refresh once this many chunks are consumed
REFRESH_WINDOW_CHUNKS = 6  # the fresh statistics come from the last 6 chunks
REFRESH_PIECE_CHUNKS = 2  # reference MAX_CHUNKS_PER_BATCH: chunks per forward when refreshing
RESET_PARTS = {"none": (False, False), "cema": (True, False), "norm": (False, True), "both": (True, True)}


# ---------------------------------------------------------------------- inputs
def load_documents(paths: Sequence[str | Path], max_docs: int | None = None) -> list[bytes]:
    """Raw bytes of every document in `paths` (files, directories, globs; .txt/.jsonl, optionally .gz/.xz)."""
    docs: list[bytes] = []
    for path in resolve_sources(paths):
        for doc in iter_documents(path):
            if max_docs is not None and len(docs) >= max_docs:
                return docs
            docs.append(doc.text)
    return docs


def parse_resets(spec: str) -> list[str]:
    """"cema,both" -> ["cema", "both"] (names of RESET_PARTS). Raises ValueError for anything else."""
    out = [s.strip().lower() for s in spec.split(",")]
    bad = [s for s in out if s not in RESET_PARTS]
    if bad:
        raise ValueError(f"--reset: {bad[0]!r} is not one of {', '.join(RESET_PARTS)}")
    return list(dict.fromkeys(out))


def positive_int(item: str, option: str, word: str) -> int:
    """int(item) >= 1, else ValueError naming the option and the accepted word ('whole', 'chunk')."""
    try:
        value = int(item)
    except ValueError:
        raise ValueError(f"{option}: {item!r} is neither a positive integer nor {word!r}") from None
    if value < 1:
        raise ValueError(f"{option}: must be >= 1, got {value}")
    return value


def parse_contexts(spec: str) -> list[int | None]:
    """"512,2048,whole" -> [512, 2048, None]. Raises ValueError for anything else."""
    out: list[int | None] = []
    for item in (s.strip() for s in spec.split(",")):
        if item.lower() in ("whole", "all", "none", "inf"):
            out.append(None)
            continue
        out.append(positive_int(item, "--contexts", "whole"))
    if not out:
        raise ValueError("--contexts: give at least one context length")
    return out


def encode_document(tokenizer: Any, document: bytes | str) -> list[int]:
    """Token ids of one document (raw bytes go through `encode_bytes` when the tokenizer has it)."""
    if isinstance(document, str):
        return list(tokenizer.encode(document))
    if hasattr(tokenizer, "encode_bytes"):
        return list(tokenizer.encode_bytes(document))
    return list(tokenizer.encode(document.decode("utf-8", errors="replace")))


def scored_start(n_tokens: int, score_tokens: int) -> int:
    """Index of the first scored token of an `n_tokens` document: the last `score_tokens` are scored, never x_0."""
    return max(1, n_tokens - score_tokens)


# ---------------------------------------------------------------------- streaming core
def _swap_norm_stats(state: StreamState, fresh: StreamState) -> StreamState:
    """`state` with every TimestepNorm's statistics (per layer and final) taken from `fresh`."""
    layers = [ls._replace(norm=f.norm) for ls, f in zip(state.layers, fresh.layers, strict=True)]
    return replace(state, layers=layers, final_norm=fresh.final_norm)


def _refresh(model: MegalodonLM, ids: torch.Tensor, end: int, total: int, state: StreamState) -> StreamState:
    """Reference §7.2: after a piece ending at `end` >= 8 chunks (tokens left), recompute the norm statistics."""
    c = model.config.chunk_size
    if end < REFRESH_MIN_CHUNKS * c or end >= total:
        return state
    window = ids[:, end - REFRESH_WINDOW_CHUNKS * c:end]
    fresh = model(window, return_state=True, last_logits_only=True).state
    return _swap_norm_stats(state, fresh)


def _piece_bounds(total: int, piece_tokens: int, reset_every: int | None) -> list[tuple[int, int]]:
    """(start, end) of the pieces fed in turn: at most piece_tokens each, never crossing a reset boundary."""
    bounds, start = [], 0
    while start < total:
        end = min(start + piece_tokens, total)
        if reset_every is not None:
            end = min(end, (start // reset_every + 1) * reset_every)
        bounds.append((start, end))
        start = end
    return bounds


def stream_nll(model: MegalodonLM, inputs: torch.Tensor, targets: torch.Tensor, n_unscored: int,
               piece_tokens: int, refresh: bool = False, reset: str | None = None,
               reset_every: int | None = None) -> torch.Tensor:
    """Per-target NLL (nats, float64) of feeding `inputs` (L,) in one carried stream, scoring positions >= n_unscored.

    `targets` (L - n_unscored,) are the tokens that follow inputs[n_unscored:]. Pieces of `piece_tokens` are fed
    in turn (2 chunks, aligned, when `refresh`); unscored positions project no logits. With `reset` (a
    RESET_PARTS name) those memory paths return to their initial values at every multiple of `reset_every`
    positions of `inputs` (so inputs[0] must be the stream's first token).
    """
    if refresh:
        piece_tokens = REFRESH_PIECE_CHUNKS * model.config.chunk_size
    reset_cema, reset_norm = RESET_PARTS[reset or "none"]
    if reset is not None and (reset_every is None or reset_every < 1):
        raise ValueError(f"reset {reset!r} needs reset_every >= 1, got {reset_every}")
    ids = inputs.to(next(model.parameters()).device).unsqueeze(0)  # also a LlamaLM (state = its KV cache)
    total = ids.shape[1]
    state: StreamState | None = None
    fresh = model.init_state(1) if reset_cema or reset_norm else None
    nlls = []
    for start, end in _piece_bounds(total, piece_tokens, reset_every if reset is not None else None):
        if fresh is not None and state is not None and start % reset_every == 0:
            state = state.with_reset(fresh, cema=reset_cema, norm=reset_norm)
        if end <= n_unscored:  # nothing scored here: carry the state only
            state = model(ids[:, start:end], state=state, return_state=True, last_logits_only=True).state
        else:
            if start < n_unscored:  # split so that only scored positions are projected
                state = model(ids[:, start:n_unscored], state=state, return_state=True, last_logits_only=True).state
                start = n_unscored
            out = model(ids[:, start:end], state=state, return_state=True)
            state = out.state
            tgt = targets[start - n_unscored:end - n_unscored].to(out.logits.device)
            logits = out.logits[0]
            logits = logits if logits.dtype == torch.float64 else logits.float()  # a float64 model stays exact
            nlls.append(F.cross_entropy(logits, tgt, reduction="none").double().cpu())
        if refresh:
            state = _refresh(model, ids, end, total, state)
    return torch.cat(nlls) if nlls else torch.zeros(0, dtype=torch.float64)


def _whole_prefix_nll(model: MegalodonLM, ids: torch.Tensor, first: int, piece_tokens: int,
                      refresh: bool, reset: str | None = None, reset_every: int | None = None) -> torch.Tensor:
    """NLL of targets ids[first:] streamed from ids[0] (optionally with the reset ablation)."""
    return stream_nll(model, ids[:-1], ids[first:], first - 1, piece_tokens, refresh, reset, reset_every)


def _windowed_nll(model: MegalodonLM, ids: torch.Tensor, first: int, context: int, piece_tokens: int) -> torch.Tensor:
    """NLL of targets ids[first:], each predicted from at most `context` (at least context - b + 1) tokens."""
    block = max(1, context // 2)
    n = ids.shape[0]
    parts = []
    for t0 in range(first, n, block):
        t1 = min(t0 + block, n)
        w = max(0, t1 - 1 - context)
        parts.append(stream_nll(model, ids[w:t1 - 1], ids[t0:t1], t0 - 1 - w, piece_tokens))
    return torch.cat(parts)


def document_nll(model: MegalodonLM, ids: torch.Tensor, first: int, context: int | None,
                 piece_tokens: int = 4096, refresh: bool = False, reset: str | None = None,
                 reset_every: int | None = None) -> torch.Tensor:
    """Per-token NLL (float64) of the scored targets ids[first:] at one context length (None = whole prefix).

    `reset` / `reset_every` (whole prefix only): the reset ablation of the module docstring.
    """
    if reset is not None:
        if context is not None:
            raise ValueError("the reset ablation applies to the whole-prefix stream (context None) only")
        return _whole_prefix_nll(model, ids, first, piece_tokens, False, reset, reset_every)
    if context is None or context >= ids.shape[0] - 1:
        return _whole_prefix_nll(model, ids, first, piece_tokens, refresh and context is None)
    return _windowed_nll(model, ids, first, context, piece_tokens)


# ---------------------------------------------------------------------- public API
def _context_result(context: int | None, nll: float, n_tokens: int, n_bytes: int, reset: str | None = None,
                    reset_every: int | None = None) -> dict[str, Any]:
    label = "whole" if context is None else str(context)
    return {
        "context": context,
        "label": label if reset is None else f"{label}, reset {reset} every {reset_every}",
        "reset": reset,
        "reset_every": reset_every,
        "bpb": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "nll_per_token": nll / n_tokens if n_tokens else float("nan"),
        "nll_sum": nll,
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
    }


def _encode_all(tokenizer: Any, documents: Iterable[bytes | str]) -> list[torch.Tensor]:
    """Token tensors of the documents that have at least one target (>= 2 tokens)."""
    encoded = (torch.tensor(encode_document(tokenizer, d), dtype=torch.long) for d in documents)
    return [ids for ids in encoded if ids.shape[0] >= 2]


def bpb_vs_context(model: MegalodonLM, tokenizer: Any, documents: list[bytes | str], contexts: list[int | None],
                   score_tokens: int, refresh: bool = False, piece_tokens: int = 4096,
                   resets: Sequence[str] = (), reset_every: int | None = None, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """BPB of the same scored tokens (each document's last `score_tokens`) at every context length.

    `progress` shows a tqdm bar over (row, document) pairs; `log` gets one line per finished row.

    Returns {"score_tokens", "n_documents", "refresh", "reset_every", "results": [{context, label, reset,
    reset_every, bpb, nll_per_token, nll_sum, n_tokens, n_bytes}, ...]}: one row per entry of `contexts`
    (None = whole prefix), then one whole-prefix row per entry of `resets` (RESET_PARTS names; the state reset
    every `reset_every` tokens, default the attention chunk). `refresh` applies only to the plain whole-prefix
    stream. Raises ValueError for bad arguments or when nothing can be scored.
    """
    if score_tokens < 1 or piece_tokens < 1:
        raise ValueError("score_tokens and piece_tokens must be >= 1")
    if not contexts and not resets:
        raise ValueError("give at least one context length or reset")
    if any(c is not None and c < 1 for c in contexts):
        raise ValueError(f"contexts must be positive ints or None, got {contexts}")
    if refresh and not isinstance(model, MegalodonLM):
        raise ValueError("refresh (TimestepNorm statistics) applies to Megalodon models only")
    bad = [r for r in resets if r not in RESET_PARTS]
    if bad:
        raise ValueError(f"unknown reset {bad[0]!r}; choose from {', '.join(RESET_PARTS)}")
    if resets:
        if not isinstance(model, MegalodonLM):
            raise ValueError("the reset ablation (CEMA state, TimestepNorm statistics) applies to Megalodon only")
        reset_every = model.config.chunk_size if reset_every is None else reset_every
        if reset_every < 1:
            raise ValueError(f"reset_every must be >= 1, got {reset_every}")
    docs = _encode_all(tokenizer, documents)
    if not docs:
        raise ValueError("no document has two or more tokens: nothing to score")
    byte_len = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long)
    firsts = [scored_start(ids.shape[0], score_tokens) for ids in docs]
    n_tokens = sum(ids.shape[0] - f for ids, f in zip(docs, firsts, strict=True))
    n_bytes = sum(int(byte_len[ids[f:]].sum()) for ids, f in zip(docs, firsts, strict=True))
    results = []
    was_training = model.training
    model.eval()
    bar = tqdm(total=(len(contexts) + len(resets)) * len(docs), unit="doc", disable=not progress)
    try:
        with torch.inference_mode():
            for context in contexts:
                label = "whole" if context is None else str(context)
                bar.set_description(f"context {label}")
                start, nll = time.perf_counter(), 0.0
                for ids, f in zip(docs, firsts, strict=True):
                    nll += float(document_nll(model, ids, f, context, piece_tokens, refresh).sum())
                    bar.update(1)
                results.append(_context_result(context, nll, n_tokens, n_bytes))
                if log is not None:
                    log(f"context {label}: bpb {results[-1]['bpb']:.4f} ({time.perf_counter() - start:.1f} s)")
            for reset in resets:
                bar.set_description(f"reset {reset}")
                start, nll = time.perf_counter(), 0.0
                for ids, f in zip(docs, firsts, strict=True):
                    nll += float(document_nll(model, ids, f, None, piece_tokens, reset=reset,
                                              reset_every=reset_every).sum())
                    bar.update(1)
                results.append(_context_result(None, nll, n_tokens, n_bytes, reset, reset_every))
                if log is not None:
                    log(f"{results[-1]['label']}: bpb {results[-1]['bpb']:.4f} ({time.perf_counter() - start:.1f} s)")
    finally:
        bar.close()
        model.train(was_training)
    return {"score_tokens": score_tokens, "n_documents": len(docs), "refresh": refresh,
            "reset_every": reset_every if resets else None, "results": results}
