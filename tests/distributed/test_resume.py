"""Sharded checkpoints: a distributed run resumed from its own checkpoint equals the uninterrupted run (bitwise at
the same world size, within 1e-6 at another one), and its consolidated weights load in one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training.conftest import run_tiny, tiny_options, train_lines

from megalodon_lm.training.checkpoint import latest_checkpoint, list_checkpoints, load_run

from .launch import check_ok, run_ranks
from .workers import train_worker

STEPS = 6
OPTIONS = dict(max_steps=STEPS, save_every=2, keep_last=10, eval_every=3, warmup_steps=2, threads=1)


def _options(text_file, out, cache, **kw):
    return tiny_options(text_file, out, cache, **{**OPTIONS, **kw})


def _rewind(src: Path, dst: Path, step: int) -> None:
    """A copy of run `src` as if it had stopped right after the checkpoint of `step`."""
    shutil.copytree(src, dst)
    for ckpt in list_checkpoints(dst):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    for f in dst.glob("sample.txt"):
        f.unlink()


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _rel_all(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Relative error of all weights as one vector (per tensor, the parameters that start at zero, such as the
    norms' offsets, would be compared against the size of a few updates)."""
    keys = sorted(b)
    return _rel(torch.cat([a[k].flatten() for k in keys]), torch.cat([b[k].flatten() for k in keys]))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, text_file, cache_dir) -> Path:
    """An uninterrupted 2-process FSDP2 run."""
    base = tmp_path_factory.mktemp("dist-run")
    out = base / "run"
    codes = run_ranks(train_worker, 2, base / "logs", _options(text_file, out, cache_dir, parallel="fsdp"),
                      timeout=180)
    check_ok(codes, base / "logs")
    return out


def test_distributed_run_matches_one_process(fsdp_run, tmp_path, text_file, cache_dir):
    # 2 ranks x batch 2 draw the same global batch as one process with batch 4.
    single = tmp_path / "single"
    run_tiny(text_file, single, cache_dir, **{**OPTIONS, "batch_size": 4})
    a, b = train_lines(fsdp_run), train_lines(single)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(rb["loss"]), (ra, rb)
        assert ra["tokens"] == rb["tokens"]
    assert _rel_all(_final_weights(fsdp_run), _final_weights(single)) <= 1e-5


def test_sharded_checkpoint_layout_and_consolidation(fsdp_run):
    ckpt = latest_checkpoint(fsdp_run)
    assert ckpt.name == f"step_{STEPS:08d}"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "rng_rank00001.safetensors").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["world_size"], state["global_batch"], state["parallel"]) == (2, 4, "fsdp")
    model, tokenizer = load_run(fsdp_run)  # the final checkpoint was consolidated by rank 0
    assert model(torch.tensor([tokenizer.encode("to be")])).logits.isfinite().all()
    assert (fsdp_run / "sample.txt").is_file() is False  # sample_tokens=0 in the tiny options
    # Intermediate checkpoints stay sharded until consolidated on demand.
    mid = fsdp_run / "checkpoints" / "step_00000004"
    assert not (mid / "model.safetensors").exists()
    from megalodon_lm.cli import main

    assert main(["consolidate", str(fsdp_run), "--step", "4"]) == 0
    assert set(load_file(str(mid / "model.safetensors"))) == set(model.state_dict())


def test_resume_same_world_size_is_bitwise(fsdp_run, tmp_path, text_file, cache_dir):
    out = tmp_path / "resumed"
    _rewind(fsdp_run, out, 4)
    codes = run_ranks(train_worker, 2, tmp_path / "logs", {"resume": True, "out": str(out), "progress": "none"},
                      timeout=180)
    check_ok(codes, tmp_path / "logs")
    wa, wb = _final_weights(fsdp_run), _final_weights(out)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = [(r["step"], r["loss"], r["grad_norm"]) for r in train_lines(fsdp_run)]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in train_lines(out)] == la


def test_resume_at_another_world_size(fsdp_run, tmp_path, text_file, cache_dir):
    # Saved by 2 FSDP ranks, resumed by one process (DCP reshards; the global batch stays 4 sequences).
    out = tmp_path / "resumed1"
    _rewind(fsdp_run, out, 2)
    codes = run_ranks(train_worker, 1, tmp_path / "logs", {"resume": True, "out": str(out), "progress": "none"},
                      timeout=180)
    check_ok(codes, tmp_path / "logs")
    wa, wb = _final_weights(fsdp_run), _final_weights(out)
    assert _rel_all(wb, wa) <= 1e-6
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert (state["world_size"], state["global_batch"]) == (1, 4)
    la, lb = train_lines(fsdp_run), train_lines(out)
    assert [r["step"] for r in lb] == list(range(1, STEPS + 1))
    for ra, rb in zip(la[2:], lb[2:], strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6 * abs(ra["loss"])


def test_single_process_resume_of_a_sharded_run_is_refused(fsdp_run, tmp_path):
    import megalodon_lm

    out = tmp_path / "copy"
    shutil.copytree(fsdp_run, out)
    with pytest.raises(ValueError, match="distributed run: resume it under torchrun"):
        megalodon_lm.train(None, resume=True, out=str(out), progress="none")
