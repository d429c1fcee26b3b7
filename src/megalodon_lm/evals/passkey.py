"""Trained passkey retrieval (docs/evaluation.md §4.1, adapted for small from-scratch models).

One sample of exactly `length` tokens::

    [book filler a] "The pass key is NNNNN. Remember it. NNNNN is the pass key.\n" [book filler b]
    "\nWhat is the pass key? The pass key is " NNNNN

N is uniform in 10000..99999 (five digits, so the answer length is fixed); the filler is a random window of
real book text (a token pool). With `chunk` set, the whole key line lies in an attention chunk *before* the one
holding the question (key start uniform over the positions that allow it), so a chunked-attention model can
only answer through its recurrent (CEMA) state. Only the five answer digits are training targets and scored.

Metric: exact match of the 5 digits under greedy decoding. With teacher forcing, greedy decoding reproduces the
answer iff the argmax at each of the 5 answer positions is the true digit, so one forward scores it; the mean
NLL of the digits (bits per digit, chance = log2(10) = 3.32) is reported as the smoother companion.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .probe_training import scored_predictions

DIGITS = 5
KEY_LINE = "The pass key is {n}. Remember it. {n} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is "


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def key_span_limit(length: int, question_tokens: int, chunk: int | None) -> int:
    """Largest end position (exclusive) of the key line: the question's chunk start, or the question start."""
    q_start = length - question_tokens - DIGITS
    return q_start if chunk is None else (q_start // chunk) * chunk


def passkey_sample(pool: torch.Tensor, tokenizer: Any, length: int, rng: np.random.Generator,
                   chunk: int | None = None, distance: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One sample: (x (length - 1,), y (length - 1,) with -100 except the 5 digits, key start position).

    `distance` fixes the key line's start at that many tokens before the question's start (instead of a random
    depth; `chunk` is then not used): the accuracy-vs-distance curve.
    """
    number = int(rng.integers(10000, 100000))
    key = _encode(tokenizer, KEY_LINE.format(n=number))
    question = _encode(tokenizer, QUESTION)
    answer = _encode(tokenizer, str(number))
    if len(answer) != DIGITS:  # a BPE may merge digits: the scored span must have a fixed length
        raise ValueError(f"the tokenizer encodes a 5-digit number as {len(answer)} tokens; passkey needs {DIGITS}")
    limit = key_span_limit(length, len(question), chunk if distance is None else None)
    if distance is not None and not len(key) <= distance <= limit:
        raise ValueError(f"passkey distance {distance} must be in [{len(key)}, {limit}] (the key line's length .. "
                         f"the question's start) for length {length}")
    if limit < len(key):
        raise ValueError(f"passkey length {length} leaves no room for the key line before the question's chunk "
                         f"(chunk {chunk}); use a longer length")
    n_filler = length - len(key) - len(question) - DIGITS
    if pool.numel() <= n_filler:
        raise ValueError(f"filler pool has {pool.numel()} tokens, a length-{length} sample needs {n_filler}")
    start = int(rng.integers(0, pool.numel() - n_filler))
    filler = pool[start:start + n_filler].tolist()
    key_pos = int(rng.integers(0, limit - len(key) + 1)) if distance is None else limit - distance
    ids = filler[:key_pos] + key + filler[key_pos:] + question + answer
    seq = torch.tensor(ids, dtype=torch.long)
    y = torch.full((length - 1,), -100, dtype=torch.long)
    y[-DIGITS:] = seq[-DIGITS:]
    return seq[:-1], y, key_pos


def passkey_batch(pool: torch.Tensor, tokenizer: Any, batch_size: int, length: int, seed: int, step: int,
                  chunk: int | None = None, distance: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (x, y) of shape (B, length - 1), a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    samples = [passkey_sample(pool, tokenizer, length, rng, chunk, distance) for _ in range(batch_size)]
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


def evaluate_passkey(model: nn.Module, pool: torch.Tensor, tokenizer: Any, length: int, n_trials: int,
                     seed: int = 1, chunk: int | None = None, batch_size: int = 8,
                     distance: int | None = None) -> dict[str, Any]:
    """Accuracy (all 5 digits), digit accuracy and bits per digit over `n_trials` samples of `length` tokens
    (with `distance`: the key line that many tokens before the question, see `passkey_sample`)."""
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    exact, digit_hits, nll = 0, 0, 0.0
    for i, start in enumerate(range(0, n_trials, batch_size)):
        b = min(batch_size, n_trials - start)
        x, y = passkey_batch(pool, tokenizer, b, length, seed, 10**6 + i, chunk, distance)  # apart from training
        hits, nlls = scored_predictions(model, x, y)
        exact += int(hits.all(1).sum())
        digit_hits += int(hits.sum())
        nll += float(nlls.double().sum())
    return {"length": length, "distance": distance, "n_trials": n_trials, "accuracy": exact / n_trials,
            "digit_accuracy": digit_hits / (n_trials * DIGITS),
            "bits_per_digit": nll / (n_trials * DIGITS) / math.log(2)}
