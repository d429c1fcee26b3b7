"""Bad input fails with one clear error before any training (no checkpoint written); through the CLI, exit code 2
and a one-line `megalodon-lm: error: ...`. A non-finite loss stops a run and keeps the last good checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from megalodon_lm import MegalodonLM
from megalodon_lm.cli import main
from megalodon_lm.training import TrainingError
from megalodon_lm.training.checkpoint import latest_checkpoint

from .conftest import TINY_MODEL, checkpoint_steps, cli, run_tiny, tiny_options, train_lines, write_toml

pytestmark = pytest.mark.usefixtures("single_thread")


def _no_training(out: Path) -> None:
    """Nothing was trained: no checkpoint and no training metrics in `out`."""
    assert latest_checkpoint(out) is None
    assert not (out / "metrics.jsonl").is_file() or not train_lines(out)


# ---------------------------------------------------------------------- the Python API
@pytest.fixture
def finished_run(tmp_path, text_file, cache_dir) -> Path:
    out = tmp_path / "finished"
    run_tiny(text_file, out, cache_dir, max_steps=2, save_every=2)
    return out


def _bad_inputs(tmp_path: Path, text_file: Path) -> dict:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    small = tmp_path / "small.txt"
    small.write_text("Too short for one window.\n")  # 26 bytes < seq_len + 1 = 33 tokens
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("a regular file\n")
    toml = tmp_path / "bad.toml"
    toml.write_text('max_steps = 3\nlearning_rate = 0.1\n')
    return {
        "missing data": (dict(data=[str(tmp_path / "no-such-file.txt")]), ValueError, r"not found.*no-such-file"),
        "empty data": (dict(data=[str(empty)]), ValueError, r"empty"),
        "data smaller than a window": (dict(data=[str(small)]), ValueError, r"fewer than one .*window"),
        "unwritable output": (dict(out=str(not_a_dir / "run")), ValueError, r"output"),
        "unknown preset": (dict(preset="gigantic"), ValueError, r"unknown preset 'gigantic'"),
        "vocab disagrees": (dict(model={**TINY_MODEL, "vocab_size": 999}), ValueError, r"vocab_size 999.*257"),
        "warmup > max_steps": (dict(warmup_steps=10, max_steps=5), ValueError, r"--warmup-steps \(10\).*--max-steps"),
        "unknown option": (dict(learning_rate=0.1), TypeError, r"learning_rate"),
        "unknown TOML key": (dict(config=str(toml)), ValueError, r"unknown key.*learning_rate"),
        "resume without checkpoint": (dict(resume=True), FileNotFoundError, r"(?i)checkpoint"),
    }


CASES = ["missing data", "empty data", "data smaller than a window", "unwritable output", "unknown preset",
         "vocab disagrees", "warmup > max_steps", "unknown option", "unknown TOML key", "resume without checkpoint"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_before_training(case, tmp_path, text_file, cache_dir):
    import megalodon_lm

    overrides, error, pattern = _bad_inputs(tmp_path, text_file)[case]
    config = overrides.pop("config", None)
    out = tmp_path / "run"
    options = {**tiny_options(text_file, out, cache_dir), **overrides}
    with pytest.raises(error, match=pattern):
        megalodon_lm.train(config, **options)
    if Path(options["out"]).is_dir():
        _no_training(Path(options["out"]))


def test_existing_run_without_resume_is_refused_and_untouched(finished_run, text_file, cache_dir):
    before = {p.relative_to(finished_run): p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"already has checkpoints.*--resume"):
        run_tiny(text_file, finished_run, cache_dir, max_steps=3, lr=1e-4)
    after = {p.relative_to(finished_run): p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    assert after == before


def test_resume_of_an_initialised_run_without_checkpoint(tmp_path, text_file, cache_dir):
    # A first attempt that failed on bad input (its data was too small) wrote nothing, so there is nothing to resume.
    small = tmp_path / "small.txt"
    small.write_text("Too short for one window.\n")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="fewer than one"):
        run_tiny(small, out, cache_dir)
    assert not out.exists() and latest_checkpoint(out) is None
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint"):
        run_tiny(text_file, out, cache_dir, resume=True)
    _no_training(out)


def test_config_validation_catches_bad_values(tmp_path, text_file, cache_dir):
    import megalodon_lm

    for bad, pattern in [(dict(seq_len=0), "--seq-len"), (dict(lr=0.0), "--lr"), (dict(device="tpu"), "--device"),
                         (dict(dtype="fp8"), "--dtype"), (dict(progress="fancy"), "--progress"),
                         (dict(resume=True, init_from=str(tmp_path)), "pick one")]:
        with pytest.raises(ValueError, match=pattern):
            megalodon_lm.train(None, **tiny_options(text_file, tmp_path / "run", cache_dir, **bad))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- the CLI
def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("megalodon-lm: error: "), stderr
    return lines[0]


def test_cli_missing_data_exits_2(tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = cli("train", "--data", str(tmp_path / "nope.txt"), "--preset", "nano", "--max-steps", "2",
               "--warmup-steps", "0", "--cache-dir", str(cache_dir), "--no-tensorboard", "--out", str(out))
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "data path not found" in line and "nope.txt" in line
    assert "Traceback" not in proc.stderr
    assert not out.exists() or latest_checkpoint(out) is None


def test_cli_unknown_toml_key_exits_2(tmp_path, text_file, cache_dir):
    config = write_toml(tmp_path / "run.toml", {"max_steps": 2, "learnin_rate": 0.1, "model": TINY_MODEL})
    proc = cli("train", "--config", str(config), "--data", str(text_file), "--cache-dir", str(cache_dir),
               "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "learnin_rate" in _one_error_line(proc.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["empty data", "data smaller than a window", "unwritable output", "unknown preset",
                                  "warmup > max_steps"])
def test_cli_in_process_exit_code_2(case, tmp_path, text_file, cache_dir, capsys):
    overrides, _, pattern = _bad_inputs(tmp_path, text_file)[case]
    options = {**tiny_options(text_file, tmp_path / "run", cache_dir), **overrides}
    argv = ["train", "--config", str(write_toml(tmp_path / "tiny.toml", {"model": TINY_MODEL}))]
    for key, value in options.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value) if value != "" else "none"]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert re.search(pattern, line), line
    out = Path(options["out"])
    if out.is_dir():
        _no_training(out)


def test_cli_existing_run_without_resume_exits_2(finished_run, text_file, cache_dir, capsys):
    argv = ["train", "--data", str(text_file), "--preset", "nano", "--cache-dir", str(cache_dir),
            "--out", str(finished_run), "--max-steps", "2", "--warmup-steps", "0", "--progress", "none"]
    assert main(argv) == 2
    assert "--resume" in _one_error_line(capsys.readouterr().err)
    assert checkpoint_steps(finished_run) == [2]


# ---------------------------------------------------------------------- non-finite loss
@pytest.fixture
def nan_at_step_6(monkeypatch):
    """Make the training loss of the 6th optimizer step NaN (evaluation and sampling are untouched)."""
    real_forward = MegalodonLM.forward
    calls = {"n": 0}

    def forward(self, input_ids, targets=None, **kwargs):
        out = real_forward(self, input_ids, targets=targets, **kwargs)
        if self.training and torch.is_grad_enabled():  # a training forward (the trainer scores the logits)
            calls["n"] += 1
            if calls["n"] == 6:
                return dataclasses.replace(out, logits=out.logits * float("nan"))
        return out

    monkeypatch.setattr(MegalodonLM, "forward", forward)
    return calls


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, text_file, cache_dir, nan_at_step_6):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite loss.*step \d+") as info:
        run_tiny(text_file, out, cache_dir, max_steps=10, save_every=4, eval_every=100)
    assert nan_at_step_6["n"] == 6
    assert "step_00000004" in str(info.value)  # it names the checkpoint it kept
    assert checkpoint_steps(out) == [4]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    lines = train_lines(out)
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in lines)
    # The kept checkpoint is usable: resuming from it (without the fault) trains to the end.
    nan_at_step_6["n"] = -10**9
    result = run_tiny(text_file, out, cache_dir, max_steps=10, save_every=4, eval_every=100, resume=True)
    assert result.step == 10 and math.isfinite(result.final_train_loss)


def test_nonfinite_loss_error_names_the_step_as_logged(tmp_path, text_file, cache_dir, nan_at_step_6):
    """metrics.jsonl and the progress lines call the k-th optimizer step "step k" (1-based): steps 1-5 were logged
    with finite losses, so the error must name step 6, not step 5."""
    with pytest.raises(TrainingError) as info:
        run_tiny(text_file, tmp_path / "run", cache_dir, max_steps=10, save_every=4, eval_every=100)
    assert re.search(r"\bstep 6\b", str(info.value)), str(info.value)


def test_cli_diverging_run_exits_1_and_keeps_checkpoint(tmp_path, text_file, cache_dir):
    """A real divergence (lr 1e6, no clipping): exit code 1, one message line, the saved checkpoints kept."""
    options = tiny_options(text_file, tmp_path / "unused", cache_dir, max_steps=20, save_every=1, keep_last=100,
                           warmup_steps=0, lr=1e6, grad_clip=1e30, eval_every=100)
    for key in ("out", "threads"):
        options.pop(key)
    config = write_toml(tmp_path / "run.toml", options)
    out = tmp_path / "run"
    proc = cli("train", "--config", str(config), "--threads", "1", "--out", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    messages = [ln for ln in proc.stderr.splitlines() if ln.startswith("megalodon-lm:")]
    assert len(messages) == 1 and "non-finite loss" in messages[0], proc.stderr
    assert "Traceback" not in proc.stderr
    saved = checkpoint_steps(out)
    assert saved and saved == list(range(1, saved[-1] + 1)) and saved[-1] < 20
    assert json.loads((out / "checkpoints" / f"step_{saved[-1]:08d}" / "trainer_state.json").read_text())[
        "step"] == saved[-1]
