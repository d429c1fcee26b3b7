"""benchmarks/head_to_head.py: curve bookkeeping (quick) and the smoke setting end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from _books import book_slug  # noqa: E402
from _h2h_report import equal_time, interpolate, read_curve, reset_table  # noqa: E402
from head_to_head import (  # noqa: E402
    DEFAULT_BOOKS,
    SETTINGS,
    book_split,
    mqar_stage,
    parse_overrides,
    train_options,
)

from megalodon_lm.training.schedule import lr_multiplier  # noqa: E402


def _metrics(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_curve_excludes_evaluation_time(tmp_path):
    rows = [{"step": 5, "loss": 3.0, "tokens": 50, "elapsed": 10.0},
            {"step": 5, "tokens": 50, "elapsed": 14.0, "val_bpb": 4.0},  # a 4 s evaluation
            {"step": 10, "loss": 2.0, "tokens": 100, "elapsed": 24.0},
            {"step": 10, "tokens": 100, "elapsed": 30.0, "val_bpb": 3.0}]
    curve = read_curve(_metrics(tmp_path / "m.jsonl", rows))
    assert [p["train_time"] for p in curve] == [10.0, 20.0]
    assert [p["val_bpb"] for p in curve] == [4.0, 3.0] and [p["tokens"] for p in curve] == [50, 100]


def test_interpolate_and_equal_time():
    assert interpolate([1.0, 3.0], [10.0, 20.0], 2.0) == 15.0
    assert interpolate([1.0, 3.0], [10.0, 20.0], 0.5) is None
    assert interpolate([1.0, 3.0], [10.0, 20.0], 3.0) == 20.0
    fast = [{"train_time": 5.0, "val_bpb": 3.0}, {"train_time": 10.0, "val_bpb": 2.0}]
    slow = [{"train_time": 10.0, "val_bpb": 2.5}, {"train_time": 20.0, "val_bpb": 1.5}]
    eq = equal_time({"a": fast, "b": slow})
    assert eq["train_time"] == 10.0 and eq["val_bpb"] == {"a": 2.0, "b": 2.5}


def test_settings_are_consistent():
    for name, cfg in SETTINGS.items():
        assert cfg["steps"] % cfg["eval_every"] == 0, name
        assert cfg["lr_check_steps"] <= cfg["steps"] and cfg["warmup"] < cfg["steps"], name
        mq, chunk = cfg["mqar"], cfg["mqar"]["model"]["chunk_size"]
        # queries beyond the chunk, or a distance curve with bins on both sides of it
        assert mq["query_start"] >= chunk or chunk in mq["distance_edges"][1:-1], name
        assert max(cfg["passkey"].get("distances", [0])) < cfg["passkey"]["length"], name
        assert cfg["ctx_doc_bytes"] > max(cfg["contexts"]) + cfg["ctx_score_tokens"], name


def test_lr_check_warms_up_then_decays():
    """The short check run has the main run's warm-up fraction and a cosine that decays within its steps."""
    for name, cfg in SETTINGS.items():
        opts = train_options(cfg, "megalodon", 1e-3, cfg["lr_check_steps"], Path("o"), [], [], Path("c"))
        warmup, steps = opts["warmup_steps"], opts["max_steps"]
        assert 1 <= warmup < steps and warmup / steps <= 2 * cfg["warmup"] / cfg["steps"] + 1 / steps, name
        assert lr_multiplier(steps - 1, warmup, steps) < 0.5 * lr_multiplier(warmup - 1, warmup, steps), name
        main = train_options(cfg, "megalodon", 1e-3, cfg["steps"], Path("o"), [], [], Path("c"))
        assert main["warmup_steps"] == cfg["warmup"], name


def test_parse_overrides():
    base = SETTINGS["long"]
    got = parse_overrides(["steps=120", "contexts=[256, 4096]", "passkey=null", "llama_full_max=512"], base)
    assert got == {"steps": 120, "contexts": [256, 4096], "passkey": None, "llama_full_max": 512}
    for bad in (["stepz=1"], ["steps"], ["steps=[1"]):
        with pytest.raises(ValueError):
            parse_overrides(bad, base)


def test_reset_table_rows():
    ctx = {"megalodon": {"results": [{"context": 256, "bpb": 2.2}, {"context": None, "bpb": 2.0}]},
           "megalodon_reset": [{"reset": "cema", "reset_every": 256, "bpb": 2.05},
                               {"reset": "both", "reset_every": 4096, "bpb": 2.0}]}
    lines = reset_table({"bpb_vs_context": ctx})
    assert "| nothing (carried) | - | 2.0000 | 0 |" in lines
    assert "| CEMA state | 256 | 2.0500 | +0.0500 |" in lines and lines[-1].endswith("| +0.0000 |")
    assert reset_table({"bpb_vs_context": {"megalodon": ctx["megalodon"]}}) == []


NO_BOOKS = "the 26 books are not downloaded (python benchmarks/fetch_books.py; optional, needs internet)"


@pytest.mark.skipif(DEFAULT_BOOKS is None, reason=NO_BOOKS)
def test_book_split_matches_the_fixed_split():
    split = book_split(DEFAULT_BOOKS)
    assert len(split["train"]) == 20 and len(split["validation"]) == 6
    assert not set(split["train"]) & set(split["validation"])
    assert "austen-emma" in {book_slug(p) for p in split["validation"]}


@pytest.mark.slow
@pytest.mark.skipif(DEFAULT_BOOKS is None, reason=NO_BOOKS)
def test_smoke_setting_end_to_end(tmp_path):
    out = tmp_path / "h2h"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "head_to_head.py"), "--setting", "smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for name in ("results.md", "bpb_vs_tokens.png", "bpb_vs_time.png", "bpb_vs_context.png"):
        assert (out / name).is_file(), name
    train = res["train"]
    assert train["megalodon"]["tokens"] == train["llama"]["tokens"] == 12 * 4 * 64
    assert abs(train["llama"]["params"] / train["megalodon"]["params"] - 1) <= 0.05
    for arch in ("megalodon", "llama"):
        assert res["curves"][arch][-1]["step"] == 12
        ctx = res["bpb_vs_context"][arch]["results"]
        assert len({r["n_bytes"] for r in ctx}) == 1 and all(0 < r["bpb"] < 10 for r in ctx)
        assert [r["length"] for r in res["passkey"][arch]] == [128, 256]
        assert 0.0 <= res["mqar"][arch]["accuracy"] <= 1.0
    assert res["bpb_vs_context"]["megalodon"]["results"][-1]["label"] == "whole"
    assert [r["context"] for r in res["bpb_vs_context"]["llama"]["results"]] == [32, 64]  # full attention <= 64
    resets = res["bpb_vs_context"]["megalodon_reset"]
    assert [(r["reset"], r["reset_every"]) for r in resets] == [("both", 64)] and 0 < resets[0]["bpb"] < 10
    # a second run reproduces the token-indexed numbers exactly (fixed seeds, steps and threads)
    out2 = tmp_path / "h2h2"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "head_to_head.py"), "--setting", "smoke",
                           "--out", str(out2), "--cache-dir", str(out / "token-cache")], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res2 = json.loads((out2 / "results.json").read_text())
    for arch in ("megalodon", "llama"):
        assert [p["val_bpb"] for p in res2["curves"][arch]] == [p["val_bpb"] for p in res["curves"][arch]]
        assert res2["final_bpb"][arch] == res["final_bpb"][arch]
    # --only mqar reruns stage 6 alone with new options and keeps everything else
    mq = {**SETTINGS["smoke"]["mqar"], "steps": 3, "min_pairs": 2}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "head_to_head.py"), "--setting", "smoke",
                           "--out", str(out2), "--resume", "--only", "mqar", "--set", f"mqar={json.dumps(mq)}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res3 = json.loads((out2 / "results.json").read_text())
    assert res3["mqar"]["steps"] == 3 and res3["config"]["mqar"]["steps"] == 3 and res3["mqar"]["min_pairs"] == 2
    assert res3["curves"] == res2["curves"] and res3["final_bpb"] == res2["final_bpb"]


def test_mqar_stage_mixed_pairs_and_full_chunk_control():
    """Stage 6 with rows of 2..4 pairs in training and the one-chunk Megalodon control (a few steps, tiny models)."""
    import torch

    mq = {**SETTINGS["smoke"]["mqar"], "steps": 2, "n_eval": 8, "min_pairs": 2, "full_chunk_control": True,
          "distance_edges": [0, 32, 64]}
    lines: list[str] = []
    out = mqar_stage({**SETTINGS["smoke"], "mqar": mq}, 257, torch.device("cpu"), lines.append)
    assert out["min_pairs"] == 2 and out["chunk"] == mq["model"]["chunk_size"]
    assert out["megalodon"]["chunk"] == 32 and out["megalodon_full"]["chunk"] == 64 and out["llama"]["chunk"] is None
    assert out["megalodon_full"]["params"] == out["megalodon"]["params"]  # only the chunk differs
    for name in ("megalodon", "llama", "megalodon_full"):
        assert 0.0 <= out[name]["accuracy"] <= 1.0 and out[name]["by_distance"]
    assert any("mqar megalodon_full" in line for line in lines)


def test_mqar_tables_list_the_control():
    from _h2h_report import probe_tables

    by = [{"min": 0, "max": 16, "n": 4, "accuracy": 0.5}, {"min": 16, "max": 64, "n": 4, "accuracy": 0.25}]
    models = ("megalodon", "llama", "megalodon_full")
    mq = {"steps": 10, "seq_len": 64, "num_pairs": 8, "query_start": 16, "chunk": 16, "min_pairs": 1,
          **{a: {"params": 1000, "accuracy": 0.375, "by_distance": by} for a in models}}
    text = "\n".join(probe_tables({"mqar": mq}, ["megalodon", "llama"]))
    assert "rows of 1-8 pairs" in text and "| 0-15 | 16-63 |" in text
    assert text.count("| Megalodon, one chunk over N (control) |") == 2


def test_only_mqar_needs_a_finished_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "head_to_head.py"), "--setting", "smoke",
                           "--out", str(tmp_path), "--resume", "--only", "mqar"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "needs --resume and a finished run" in proc.stderr


def test_probe_plot_and_report_rebuild(tmp_path):
    """probes_vs_distance.png from by-distance probe results; `_h2h_report.py OUT` rebuilds from results.json."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from _h2h_report import main as report_main
    from _h2h_report import probe_plot

    pk = {"chunk": 256, **{f"{a}_by_distance": [{"distance": d, "accuracy": acc} for d, acc in ((64, 1.0), (512, 0.1))]
                           for a in ("megalodon", "llama")}}
    mq = {"chunk": 64, **{a: {"by_distance": [{"min": 0, "max": 32, "n": 5, "accuracy": 0.9}]} for a in ("megalodon",
                                                                                                     "llama")}}
    mq["megalodon_full"] = {"by_distance": [{"min": 0, "max": 32, "n": 5, "accuracy": 1.0}]}
    assert probe_plot({"passkey": pk, "mqar": mq}, tmp_path, plt)
    assert (tmp_path / "probes_vs_distance.png").stat().st_size > 0
    assert not probe_plot({}, tmp_path, plt)
    assert report_main([str(tmp_path / "missing")]) == 2
