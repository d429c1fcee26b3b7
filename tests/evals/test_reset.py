"""The reset ablation of `megalodon_lm.evals.ppl`: exactness against the plain stream and independent segments."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from megalodon_lm.data.tokenizer import ByteTokenizer
from megalodon_lm.evals.cli import add_eval_parser, parse_reset_every
from megalodon_lm.evals.ppl import bpb_vs_context, document_nll, parse_resets, scored_start
from megalodon_lm.models.config import MegalodonConfig
from megalodon_lm.models.megalodon import MegalodonLM

CHUNK = 16
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 2


@pytest.fixture(scope="module")
def model() -> MegalodonLM:
    """float64, so exactness is checked to ~1e-12 rather than to float32 noise."""
    torch.manual_seed(0)
    return MegalodonLM(MegalodonConfig.from_preset("nano", chunk_size=CHUNK, vocab_size=257)).double().eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.tensor(ByteTokenizer().encode(TEXT[:7 * CHUNK + 5]))  # 7 chunks and a partial one


def _segments_nll(model: MegalodonLM, ids: torch.Tensor, first: int, period: int) -> float:
    """Independent segments: inputs [k*period, (k+1)*period) each from a fresh state, targets ids[first:]."""
    inputs = ids[:-1]
    total = 0.0
    with torch.no_grad():
        for s in range(0, inputs.shape[0], period):
            seg = inputs[s:s + period]
            logits = model(seg.unsqueeze(0)).logits[0]
            tgt = ids[s + 1:s + 1 + seg.shape[0]]
            keep = torch.arange(s + 1, s + 1 + seg.shape[0]) >= first
            total += float(F.cross_entropy(logits[keep], tgt[keep], reduction="sum"))
    return total


def _nll(model, ids, first, **kw) -> float:
    with torch.inference_mode():
        return float(document_nll(model, ids, first, None, **kw).sum())


@pytest.mark.parametrize("piece", [7, 4096])
def test_reset_none_equals_whole_prefix(model, ids, piece):
    first = scored_start(len(ids), 60)
    whole = _nll(model, ids, first, piece_tokens=piece)
    for every in (CHUNK, 24):
        assert _nll(model, ids, first, piece_tokens=piece, reset="none", reset_every=every) == pytest.approx(
            whole, rel=1e-12)


@pytest.mark.parametrize("period", [CHUNK, 2 * CHUNK])
def test_reset_both_equals_independent_segments(model, ids, period):
    first = scored_start(len(ids), 70)
    expected = _segments_nll(model, ids, first, period)
    assert _nll(model, ids, first, piece_tokens=7, reset="both", reset_every=period) == pytest.approx(
        expected, rel=1e-12)
    # and the carried stream is really different: the memory paths do carry something
    assert _nll(model, ids, first) != pytest.approx(expected, rel=1e-6)


def test_each_path_matters_and_period_beyond_document_is_none(model, ids):
    first = scored_start(len(ids), 70)
    whole = _nll(model, ids, first)
    parts = {r: _nll(model, ids, first, reset=r, reset_every=CHUNK) for r in ("cema", "norm", "both")}
    assert len({round(v, 9) for v in [whole, *parts.values()]}) == 4  # all four differ
    assert _nll(model, ids, first, reset="both", reset_every=10 * len(ids)) == pytest.approx(whole, rel=1e-12)


def test_bpb_vs_context_rows_and_errors(model):
    tok = ByteTokenizer()
    res = bpb_vs_context(model, tok, [TEXT[:100]], [None], score_tokens=40, resets=["none", "cema"])
    whole, none, cema = res["results"]
    assert res["reset_every"] == CHUNK
    assert none["label"] == f"whole, reset none every {CHUNK}" and cema["reset"] == "cema"
    assert none["nll_sum"] == pytest.approx(whole["nll_sum"], rel=1e-12)
    assert {r["n_bytes"] for r in res["results"]} == {40}
    with pytest.raises(ValueError):
        bpb_vs_context(model, tok, [TEXT], [None], score_tokens=4, resets=["attention"])
    with pytest.raises(ValueError):
        document_nll(model, torch.tensor(tok.encode(TEXT[:50])), 10, 8, reset="both", reset_every=CHUNK)
    assert parse_resets("cema, both,cema") == ["cema", "both"]
    with pytest.raises(ValueError):
        parse_resets("cema,kv")
    assert parse_reset_every("chunk") is None and parse_reset_every("256") == 256
    for bad in ("0", "x"):
        with pytest.raises(ValueError):
            parse_reset_every(bad)


def test_cli_reset_rows(tmp_path, capsys):
    import megalodon_lm

    data = tmp_path / "data.txt"
    data.write_text(TEXT * 2)
    tiny = {"num_layers": 1, "model_dim": 32, "z_dim": 16, "value_dim": 32, "num_heads": 1, "ffn_hidden_dim": 64,
            "chunk_size": CHUNK, "norm_num_groups": 4}
    megalodon_lm.train(data=[str(data)], preset="nano", model=tiny, seq_len=32, batch_size=2, max_steps=1,
                       warmup_steps=0, max_time="", progress="none", tensorboard=False, sample_tokens=0,
                       cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), threads=1)
    parser = argparse.ArgumentParser(prog="megalodon-lm")
    add_eval_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "res.json"
    args = parser.parse_args(["eval", "ppl", str(tmp_path / "run"), "--data", str(data), "--contexts", "whole",
                              "--score-tokens", "48", "--reset", "cema,norm,both", "--reset-every", "32",
                              "--out", str(out)])
    assert args.func(args) == 0
    assert "whole, reset norm every 32" in capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert [(r["reset"], r["reset_every"]) for r in rows] == [(None, None), ("cema", 32), ("norm", 32), ("both", 32)]
