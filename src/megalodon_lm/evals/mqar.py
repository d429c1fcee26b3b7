"""Multi-query associative recall, MQAR (docs/evaluation.md §4.2; Zoology, Arora et al. 2023).

A sequence of N tokens over a vocabulary of V ids: positions 0..2K-1 hold K (key, value) pairs k1 v1 k2 v2 ...
(keys distinct, from 1..V/2-1; values distinct, from V/2..V-1; id 0 is filler). From `query_start` (default 2K)
on, each key appears once more as a query at an even offset 2g; the gaps g are drawn without replacement with
p(g) proportional to (g + 1)^(alpha - 1), alpha = 0.01 (most queries early, a long tail). Everything else is 0,
the position after a query included (as in Zoology). Targets: at each query position the value (loss and
accuracy only there).

The answer is deliberately not written after its query. Every key is asked exactly once, so with the answers
in the input the last queries can be answered by elimination (the one value not yet seen in the query
region) without any recall: a 2-layer Llama trained that way scored 0.16 on the first queries and 0.95 on the
last (docs/results.md) while scoring chance without the answers.

`query_start` >= the attention chunk puts every query in a later chunk than all pairs (when 2K <= chunk): a
chunked-attention model can then answer only through its recurrent (CEMA) state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .probe_training import scored_predictions

ALPHA = 0.01


def check_layout(seq_len: int, num_pairs: int, vocab_size: int, query_start: int | None) -> int:
    """The resolved query start; ValueError when the layout does not fit."""
    if num_pairs < 1 or vocab_size < 4:
        raise ValueError(f"need num_pairs >= 1 and vocab_size >= 4, got {num_pairs}, {vocab_size}")
    if num_pairs > vocab_size // 2 - 1:
        raise ValueError(f"{num_pairs} distinct keys do not fit in ids 1..{vocab_size // 2 - 1}")
    q0 = 2 * num_pairs if query_start is None else query_start
    if q0 < 2 * num_pairs:
        raise ValueError(f"query_start {q0} overlaps the {num_pairs} key-value pairs (first {2 * num_pairs} tokens)")
    if (seq_len - q0) // 2 < num_pairs:
        raise ValueError(f"seq_len {seq_len} leaves room for {(seq_len - q0) // 2} queries after position {q0}, "
                         f"need {num_pairs}")
    return q0


def mqar_batch(batch_size: int, seq_len: int, num_pairs: int, vocab_size: int, seed: int, step: int,
               query_start: int | None = None, min_pairs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (B, seq_len), a pure function of (seed, step); y is -100 except at the K query positions.

    With `min_pairs` (training only) each row holds its own number of pairs k, uniform in [min_pairs, num_pairs],
    in the layout of `num_pairs` (pairs from position 0, queries from `query_start`), so rows differ in their
    number of targets. Why: trained on K = 8 alone, a 2-layer Llama sat at 1/K (choosing among the values
    present) for 6,000 steps; with rows of 1..8 pairs (N 32, batch 64) it learned recall by step 2,400
    (docs/results.md).
    """
    q0 = check_layout(seq_len, num_pairs, vocab_size, query_start)
    if min_pairs is not None and not 1 <= min_pairs <= num_pairs:
        raise ValueError(f"min_pairs must be in 1..num_pairs ({num_pairs}), got {min_pairs}")
    rng = np.random.default_rng([seed, step])
    half = vocab_size // 2
    slots = (seq_len - q0) // 2
    weights = np.arange(1, slots + 1, dtype=np.float64) ** (ALPHA - 1)
    weights /= weights.sum()
    x = np.zeros((batch_size, seq_len), dtype=np.int64)
    y = np.full((batch_size, seq_len), -100, dtype=np.int64)
    for b in range(batch_size):
        k = num_pairs if min_pairs is None else int(rng.integers(min_pairs, num_pairs + 1))
        keys = rng.choice(np.arange(1, half), size=k, replace=False)
        values = rng.choice(np.arange(half, vocab_size), size=k, replace=False)
        x[b, 0:2 * k:2] = keys
        x[b, 1:2 * k:2] = values
        gaps = rng.choice(slots, size=k, replace=False, p=weights)
        pos = q0 + 2 * gaps
        order = rng.permutation(k)  # which key is asked at which position
        x[b, pos] = keys[order]
        y[b, pos] = values[order]
    return torch.from_numpy(x), torch.from_numpy(y)


def query_distances(x: torch.Tensor, y: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """(B, K) distance from each scored query to its key's position in the pairs region (row order of y's mask)."""
    pos = (y != -100).nonzero()  # (B * K, 2) in row-major order, as scored_predictions reads them
    keys = x[pos[:, 0], pos[:, 1]]
    pairs = x[pos[:, 0], : 2 * num_pairs : 2]  # (B * K, K) the keys of that row
    key_pos = 2 * (pairs == keys[:, None]).int().argmax(1)
    return (pos[:, 1] - key_pos).view(x.shape[0], -1)


def evaluate_mqar(model: nn.Module, seq_len: int, num_pairs: int, vocab_size: int, n_sequences: int,
                  seed: int = 1, query_start: int | None = None, batch_size: int = 16,
                  distance_edges: list[int] | None = None) -> dict[str, Any]:
    """Accuracy over all queries of `n_sequences` fresh sequences (steps disjoint from any training seed).

    With `distance_edges` [e0, e1, ...] also "by_distance": accuracy of the queries whose distance to their key
    (query position minus key position) lies in [e_i, e_{i+1}), one entry per bin with any query.
    """
    if n_sequences < 1:
        raise ValueError(f"n_sequences must be >= 1, got {n_sequences}")
    hits, total = 0, 0
    all_ok, all_dist = [], []
    for i, start in enumerate(range(0, n_sequences, batch_size)):
        b = min(batch_size, n_sequences - start)
        x, y = mqar_batch(b, seq_len, num_pairs, vocab_size, seed, 10**6 + i, query_start)
        ok, _ = scored_predictions(model, x, y)
        hits += int(ok.sum())
        total += ok.numel()
        all_ok.append(ok.flatten())
        all_dist.append(query_distances(x, y, num_pairs).flatten())
    out = {"seq_len": seq_len, "num_pairs": num_pairs,
           "query_start": check_layout(seq_len, num_pairs, vocab_size, query_start),
           "n_sequences": n_sequences, "accuracy": hits / total}
    if distance_edges:
        ok, dist = torch.cat(all_ok), torch.cat(all_dist)
        bins = []
        for lo, hi in zip(distance_edges[:-1], distance_edges[1:], strict=True):
            sel = (dist >= lo) & (dist < hi)
            if int(sel.sum()):
                bins.append({"min": lo, "max": hi, "n": int(sel.sum()), "accuracy": float(ok[sel].float().mean())})
        out["by_distance"] = bins
    return out
