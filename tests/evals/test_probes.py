"""Synthetic long-context probes: passkey and MQAR generators (layout, determinism), scoring, probe training."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from megalodon_lm.data.tokenizer import ByteTokenizer
from megalodon_lm.evals.mqar import evaluate_mqar, mqar_batch, query_distances
from megalodon_lm.evals.passkey import (
    DIGITS,
    KEY_LINE,
    QUESTION,
    evaluate_passkey,
    passkey_batch,
    passkey_sample,
)
from megalodon_lm.evals.probe_training import lr_at, scored_predictions, train_probe
from megalodon_lm.models import MegalodonConfig, MegalodonLM
from megalodon_lm.models.megalodon import MegalodonOutput

TOK = ByteTokenizer()
POOL = torch.tensor(list(("It was a truth universally acknowledged, that a single man in possession of a good "
                          "fortune, must be in want of a wife. " * 40).encode()), dtype=torch.long)


class Oracle(nn.Module):
    """Puts all mass on a chosen answer at every position: `answer(x_row) -> (L,) ids` (or uniform logits)."""

    def __init__(self, vocab: int, answer=None) -> None:
        super().__init__()
        self.vocab, self.answer = vocab, answer
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> MegalodonOutput:
        logits = torch.zeros(*x.shape, self.vocab)
        if self.answer is not None:
            for b in range(x.shape[0]):
                logits[b, torch.arange(x.shape[1]), self.answer(x[b])] = 20.0
        return MegalodonOutput(logits=logits)


def _passkey_oracle(row: torch.Tensor) -> torch.Tensor:
    """The digits after the key line's 'is ', shifted so position t predicts x[t + 1] of the answer."""
    text = bytes(row.tolist()).decode()
    digits = re.search(r"The pass key is (\d{5})\.", text).group(1)
    out = row.clone()
    out[-DIGITS:] = torch.tensor(list(digits.encode()))  # positions L-5..L-1 predict the 5 answer digits
    return out


@pytest.mark.parametrize("length,chunk", [(300, 64), (257, 128), (255, None)])
def test_passkey_layout(length, chunk):
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y, key_pos = passkey_sample(POOL, TOK, length, rng, chunk)
        assert x.shape == y.shape == (length - 1,)
        full = torch.cat([x, y[-1:]])
        text = bytes(full.tolist()).decode()
        number = re.search(r"The pass key is (\d{5})\.", text).group(1)
        assert text.endswith(QUESTION + number)
        assert (y != -100).sum() == DIGITS and bytes(y[-DIGITS:].tolist()).decode() == number
        assert text[key_pos:].startswith(KEY_LINE.format(n=number))
        if chunk is not None:  # the whole key line lies in an earlier chunk than the question
            q_start = length - len(QUESTION) - DIGITS
            assert key_pos + len(KEY_LINE.format(n=number)) <= (q_start // chunk) * chunk


def test_passkey_deterministic_and_errors():
    a = passkey_batch(POOL, TOK, 3, 200, seed=5, step=7, chunk=64)
    b = passkey_batch(POOL, TOK, 3, 200, seed=5, step=7, chunk=64)
    c = passkey_batch(POOL, TOK, 3, 200, seed=5, step=8, chunk=64)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="no room"):
        passkey_batch(POOL, TOK, 1, 100, seed=0, step=0, chunk=64)
    with pytest.raises(ValueError, match="filler pool"):
        passkey_batch(POOL[:50], TOK, 1, 200, seed=0, step=0)
    with pytest.raises(ValueError, match="n_trials"):
        evaluate_passkey(Oracle(257), POOL, TOK, 200, 0)


def test_passkey_scoring_oracle_and_chance():
    perfect = evaluate_passkey(Oracle(257, _passkey_oracle), POOL, TOK, 200, n_trials=10, chunk=64, batch_size=4)
    assert perfect["accuracy"] == 1.0 and perfect["digit_accuracy"] == 1.0 and perfect["bits_per_digit"] < 1e-3
    uniform = evaluate_passkey(Oracle(257), POOL, TOK, 200, n_trials=10, chunk=64)
    assert uniform["accuracy"] == 0.0
    assert abs(uniform["bits_per_digit"] - math.log2(257)) < 1e-6


def test_mqar_layout():
    x, y = mqar_batch(4, 64, 6, 40, seed=3, step=0, query_start=32)
    assert x.shape == y.shape == (4, 64)
    for b in range(4):
        keys, values = x[b, 0:12:2], x[b, 1:12:2]
        assert len(set(keys.tolist())) == 6 and len(set(values.tolist())) == 6
        assert bool(((keys >= 1) & (keys < 20)).all()) and bool(((values >= 20) & (values < 40)).all())
        assert bool((x[b, 12:32] == 0).all())
        pos = (y[b] != -100).nonzero().flatten()
        assert len(pos) == 6 and bool((pos >= 32).all()) and bool((pos % 2 == 0).all())
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for p in pos.tolist():
            assert pairs[int(x[b, p])] == int(y[b, p]) and int(x[b, p + 1]) == 0  # no answer in the input
    again = mqar_batch(4, 64, 6, 40, seed=3, step=0, query_start=32)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])


def test_mqar_mixed_pair_counts():
    x, y = mqar_batch(64, 64, 6, 40, seed=3, step=0, query_start=32, min_pairs=2)
    counts = (y != -100).sum(1)
    assert set(counts.tolist()) == {2, 3, 4, 5, 6}  # every count of 2..6 drawn among 64 rows
    for b in range(64):
        k = int(counts[b])
        keys, values = x[b, 0:2 * k:2], x[b, 1:2 * k:2]
        assert bool((keys >= 1).all()) and bool((values >= 20).all()) and bool((x[b, 2 * k:32] == 0).all())
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        pos = (y[b] != -100).nonzero().flatten()
        assert bool((pos >= 32).all()) and sorted(int(x[b, p]) for p in pos) == sorted(pairs)
        assert all(pairs[int(x[b, p])] == int(y[b, p]) for p in pos)
    same = mqar_batch(4, 64, 6, 40, seed=3, step=0, query_start=32, min_pairs=6)  # k = 6 always
    assert bool(((same[1] != -100).sum(1) == 6).all())
    with pytest.raises(ValueError, match="min_pairs"):
        mqar_batch(1, 64, 6, 40, seed=0, step=0, query_start=32, min_pairs=7)


def test_mqar_errors():
    with pytest.raises(ValueError, match="overlaps"):
        mqar_batch(1, 64, 8, 64, seed=0, step=0, query_start=10)
    with pytest.raises(ValueError, match="room for"):
        mqar_batch(1, 40, 8, 64, seed=0, step=0, query_start=32)
    with pytest.raises(ValueError, match="distinct keys"):
        mqar_batch(1, 400, 40, 64, seed=0, step=0)


def test_mqar_scoring_oracle_and_chance():
    def answer(row: torch.Tensor) -> torch.Tensor:
        pairs = dict(zip(row[0:8:2].tolist(), row[1:8:2].tolist(), strict=True))
        return torch.tensor([pairs.get(int(t), 0) for t in row])

    assert evaluate_mqar(Oracle(32, answer), 48, 4, 32, n_sequences=20, query_start=16)["accuracy"] == 1.0
    assert evaluate_mqar(Oracle(32), 48, 4, 32, n_sequences=20, query_start=16)["accuracy"] < 0.2


def test_passkey_at_fixed_distance():
    rng = np.random.default_rng(1)
    q_start = 300 - len(QUESTION) - DIGITS
    for d in (len(KEY_LINE.format(n=12345)), 100, q_start):
        x, _, key_pos = passkey_sample(POOL, TOK, 300, rng, chunk=64, distance=d)
        assert key_pos == q_start - d and bytes(x[key_pos:key_pos + 16].tolist()) == b"The pass key is "
    res = evaluate_passkey(Oracle(257, _passkey_oracle), POOL, TOK, 300, n_trials=4, distance=150)
    assert res["distance"] == 150 and res["accuracy"] == 1.0
    for bad in (10, q_start + 1):  # shorter than the key line / before the sample starts
        with pytest.raises(ValueError, match="distance"):
            passkey_sample(POOL, TOK, 300, rng, distance=bad)


def test_mqar_accuracy_by_distance():
    x, y = mqar_batch(3, 64, 6, 40, seed=3, step=0, query_start=32)
    dist = query_distances(x, y, 6)
    for b in range(3):
        for p, d in zip((y[b] != -100).nonzero().flatten().tolist(), dist[b].tolist(), strict=True):
            assert int(x[b, p - d]) == int(x[b, p])  # d tokens back is the key itself, in the pairs region
            assert p - d < 12

    def near_only(row: torch.Tensor) -> torch.Tensor:  # answers only queries less than 40 tokens from their key
        pairs = {int(k): (2 * i, int(v)) for i, (k, v) in enumerate(zip(row[0:8:2], row[1:8:2], strict=True))}
        return torch.tensor([pairs[int(t)][1] if int(t) in pairs and 0 < p - pairs[int(t)][0] < 40 else 0
                             for p, t in enumerate(row.tolist())])

    res = evaluate_mqar(Oracle(32, near_only), 80, 4, 32, n_sequences=32, query_start=16, distance_edges=[0, 40, 80])
    near, far = res["by_distance"]
    assert (near["min"], near["max"], far["min"]) == (0, 40, 40)
    assert near["accuracy"] == 1.0 and far["accuracy"] == 0.0 and near["n"] + far["n"] == 32 * 4


def test_scored_predictions_needs_equal_counts():
    y = torch.full((2, 5), -100)
    y[0, 1] = 3
    with pytest.raises(ValueError, match="same number"):
        scored_predictions(Oracle(8), torch.zeros(2, 5, dtype=torch.long), y)


def test_lr_schedule():
    assert lr_at(0, 1.0, 4, 20) == 0.25 and lr_at(3, 1.0, 4, 20) == 1.0
    assert abs(lr_at(4, 1.0, 4, 20) - 1.0) < 1e-12 and abs(lr_at(20, 1.0, 4, 20) - 0.1) < 1e-12


def test_train_probe_learns_short_range_mqar():
    # Keys and queries within one attention chunk: a tiny Megalodon learns it (chance is 1/6 with 6 values).
    torch.manual_seed(0)
    cfg = MegalodonConfig.from_preset("nano", num_layers=1, model_dim=32, z_dim=16, value_dim=32, num_heads=1,
                                      ffn_hidden_dim=64, chunk_size=16, norm_num_groups=4, vocab_size=12)
    model = MegalodonLM(cfg)
    before = evaluate_mqar(model, 12, 2, 12, n_sequences=64)["accuracy"]
    stats = train_probe(model, lambda s: mqar_batch(32, 12, 2, 12, seed=0, step=s), steps=60, lr=1e-2, warmup=5)
    after = evaluate_mqar(model, 12, 2, 12, n_sequences=64)["accuracy"]
    assert stats["tokens"] == 60 * 32 * 12 and math.isfinite(stats["final_loss"])
    assert after > max(0.5, before + 0.3), (before, after)
    with pytest.raises(ValueError, match="steps"):
        train_probe(model, lambda s: mqar_batch(2, 12, 2, 12, seed=0, step=s), steps=0, lr=1e-3)
