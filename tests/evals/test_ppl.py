"""Tests of `megalodon_lm.evals`: BPB vs context length on a tiny random model."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from megalodon_lm.data.tokenizer import ByteTokenizer
from megalodon_lm.evals.cli import add_eval_parser
from megalodon_lm.evals.ppl import bpb_vs_context, document_nll, parse_contexts, scored_start
from megalodon_lm.models.config import MegalodonConfig
from megalodon_lm.models.megalodon import MegalodonLM

CHUNK = 16
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 3


@pytest.fixture(scope="module")
def model() -> MegalodonLM:
    torch.manual_seed(0)
    return MegalodonLM(MegalodonConfig.from_preset("nano", chunk_size=CHUNK, vocab_size=257)).eval()


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer()


def _full_forward_nll(model: MegalodonLM, ids: torch.Tensor, first: int) -> float:
    with torch.no_grad():
        logits = model(ids[:-1].unsqueeze(0)).logits[0]
    return float(F.cross_entropy(logits[first - 1:].double(), ids[first:], reduction="sum"))


def test_same_scored_bytes_and_bpb_formula(model, tok):
    docs = [TEXT[:150].encode(), TEXT[:90], b"x"]  # the 1-token document has no target and is skipped
    res = bpb_vs_context(model, tok, docs, [8, 32, None], score_tokens=64)
    assert res["n_documents"] == 2
    rows = res["results"]
    assert {(r["n_tokens"], r["n_bytes"]) for r in rows} == {(128, 128)}
    for r in rows:
        assert math.isfinite(r["bpb"])
        assert r["bpb"] == pytest.approx(r["nll_sum"] / math.log(2) / r["n_bytes"], rel=1e-12)
        assert r["nll_per_token"] == pytest.approx(r["nll_sum"] / r["n_tokens"], rel=1e-12)
    assert [r["label"] for r in rows] == ["8", "32", "whole"]


def test_short_document_scores_what_exists(model, tok):
    res = bpb_vs_context(model, tok, [b"abcdef"], [2, None], score_tokens=100)
    assert [r["n_tokens"] for r in res["results"]] == [5, 5]  # every token but the first
    assert scored_start(6, 100) == 1 and scored_start(500, 100) == 400


def test_whole_prefix_equals_single_forward(model, tok):
    ids = torch.tensor(tok.encode(TEXT[:200]))
    first = scored_start(len(ids), 70)
    expected = _full_forward_nll(model, ids, first)
    with torch.inference_mode():
        for piece in (7, 16, 4096):  # any split of the stream is exact
            got = float(document_nll(model, ids, first, None, piece_tokens=piece).sum())
            assert got == pytest.approx(expected, rel=1e-5)


def test_context_longer_than_document_equals_whole(model, tok):
    doc = TEXT[:120]
    res = bpb_vs_context(model, tok, [doc], [1000, None], score_tokens=50)
    a, b = res["results"]
    assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-5)


def test_context_limits_what_is_seen(model, tok):
    """Tokens more than c before the scored region cannot change the context-c score, but do change 'whole'."""
    ids = torch.tensor(tok.encode(TEXT[:160]))
    first, c = scored_start(len(ids), 40), 12
    altered = ids.clone()
    altered[:first - c] = (altered[:first - c] + 7) % 256
    with torch.inference_mode():
        nll = [float(document_nll(model, x, first, c, piece_tokens=5).sum()) for x in (ids, altered)]
        whole = [float(document_nll(model, x, first, None).sum()) for x in (ids, altered)]
    assert nll[0] == pytest.approx(nll[1], rel=1e-5)
    assert whole[0] != pytest.approx(whole[1], rel=1e-7)


def test_refresh_changes_nothing_before_eight_chunks(model, tok):
    short = torch.tensor(tok.encode(TEXT[:8 * CHUNK + 1]))  # 8 chunks of inputs: no refresh can trigger
    long = torch.tensor(tok.encode(TEXT[:12 * CHUNK + 1]))
    with torch.inference_mode():
        for ids, same in ((short, True), (long, False)):
            first = scored_start(len(ids), 30)
            plain = float(document_nll(model, ids, first, None).sum())
            refreshed = float(document_nll(model, ids, first, None, refresh=True).sum())
            assert math.isfinite(refreshed)
            assert (refreshed == pytest.approx(plain, rel=1e-5)) is same


def test_parse_contexts_and_bad_input(model, tok):
    assert parse_contexts("512, 2048,whole") == [512, 2048, None]
    for bad in ("", "0", "abc", "512,,whole"):
        with pytest.raises(ValueError):
            parse_contexts(bad)
    with pytest.raises(ValueError):
        bpb_vs_context(model, tok, [b"a"], [None], score_tokens=4)
    with pytest.raises(ValueError):
        bpb_vs_context(model, tok, [TEXT], [None], score_tokens=0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megalodon-lm")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_on_tiny_run(tmp_path, capsys):
    import megalodon_lm

    data = tmp_path / "data.txt"
    data.write_text(TEXT * 4)
    tiny = {"num_layers": 1, "model_dim": 32, "z_dim": 16, "value_dim": 32, "num_heads": 1, "ffn_hidden_dim": 64,
            "chunk_size": CHUNK, "norm_num_groups": 4}
    megalodon_lm.train(data=[str(data)], preset="nano", model=tiny, seq_len=32, batch_size=2, max_steps=2,
                       warmup_steps=0, max_time="", progress="none", tensorboard=False, sample_tokens=0,
                       cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), threads=1)
    out, plot = tmp_path / "res.json", tmp_path / "curve.png"
    args = _parser().parse_args(["eval", "ppl", str(tmp_path / "run"), "--data", str(data), "--contexts",
                                 "16,64,whole", "--score-tokens", "64", "--max-docs", "1", "--refresh",
                                 "--out", str(out), "--plot", str(plot)])
    assert args.func(args) == 0
    table, log = capsys.readouterr()
    assert "whole" in table and "bpb" in table
    # Not a terminal: one progress line per context length on stderr, as each finishes.
    assert [line.split(":")[0] for line in log.splitlines()] == ["context 16", "context 64", "context whole"]
    res = json.loads(out.read_text())
    assert [r["context"] for r in res["results"]] == [16, 64, None]
    assert all(r["n_bytes"] == 64 for r in res["results"])
    assert plot.stat().st_size > 0
    bad = _parser().parse_args(["eval", "ppl", str(tmp_path / "run"), "--data", str(data), "--contexts", "x"])
    with pytest.raises(ValueError):
        bad.func(bad)
