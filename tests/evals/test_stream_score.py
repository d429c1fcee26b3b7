"""`score_rows`: a ragged batch streamed piece by piece scores what one full forward per row scores."""

from __future__ import annotations

import pytest
import torch

from megalodon_lm.evals.stream_score import score_rows
from megalodon_lm.models.config import MegalodonConfig
from megalodon_lm.models.megalodon import MegalodonLM


@pytest.fixture(scope="module")
def model() -> MegalodonLM:
    torch.manual_seed(0)
    return MegalodonLM(MegalodonConfig.from_preset("nano", chunk_size=8, num_layers=2)).eval()


def _reference(model, row, n):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([row[:-1]])).logits[0].double(), -1)
    targets = torch.tensor(row[1:])
    lp = logp[torch.arange(len(row) - 1), targets][len(row) - 1 - n:]
    greedy = bool((logp.argmax(-1) == targets)[len(row) - 1 - n:].all())
    return float(lp.sum()), greedy


@pytest.mark.parametrize("piece", [5, 16, 4096])
def test_ragged_batch_equals_rows_alone(model, piece):
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (40, 7, 23, 2)]
    n_scored = [39, 3, 0, 1]
    scores = score_rows(model, rows, n_scored, piece_tokens=piece)
    for row, n, s in zip(rows, n_scored, scores, strict=True):
        lp, greedy = _reference(model, row, n)
        assert s.logprob == pytest.approx(lp, abs=1e-4)
        assert s.is_greedy == greedy


def test_greedy_flag_on_the_models_own_continuation(model):
    from megalodon_lm import generate

    prompt = [5, 9, 200, 3, 77, 41]
    cont = generate(model, [prompt], max_new_tokens=6, temperature=0)[0].tolist()
    (s,) = score_rows(model, [prompt + cont], [6])
    assert s.is_greedy and s.logprob < 0


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="at most 2 predicted tokens"):
        score_rows(model, [[1, 2, 3]], [3])
    with pytest.raises(ValueError, match="piece_tokens"):
        score_rows(model, [[1, 2, 3]], [1], piece_tokens=0)
    with pytest.raises(ValueError, match="2 rows but 1"):
        score_rows(model, [[1, 2], [3, 4]], [1])
