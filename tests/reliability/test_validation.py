"""Every option is validated before anything is written: one line, exit 2, no output directory created.
TOML errors name the file (and the key)."""

from __future__ import annotations

import pytest
import torch
from training.conftest import tiny_options, write_toml

from .helpers import final_weights, one_error_line, run_cli, tiny_run, train_argv

pytestmark = pytest.mark.usefixtures("single_thread")

BAD_FLAGS = {
    "grad clip negative": (["--grad-clip", "-1"], r"--grad-clip must be a positive number, or 0"),
    "grad clip nan": (["--grad-clip", "nan"], r"--grad-clip must be"),
    "beta1 2": (["--beta1", "2"], r"--beta1 must lie in \[0, 1\), got 2"),
    "beta2 1": (["--beta2", "1"], r"--beta2 must lie in \[0, 1\)"),
    "eps negative": (["--eps", "-1"], r"--eps must be a positive number"),
    "eps zero": (["--eps", "0"], r"--eps must be a positive number"),
    "weight decay negative": (["--weight-decay", "-0.1"], r"--weight-decay must be a number >= 0"),
    "threads negative": (["--threads", "-2"], r"--threads must be >= 1, got -2"),
    "threads zero": (["--threads", "0"], r"--threads must be >= 1"),
    "lr infinite": (["--lr", "inf"], r"--lr must be a positive number"),
    "min lr ratio": (["--min-lr-ratio", "2"], r"--min-lr-ratio must lie in \[0, 1\]"),
    "max time": (["--max-time", "10x"], r"invalid duration '10x'"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_option_is_refused_before_anything_is_written(case, tmp_path, text_file, cache_dir, capsys):
    flags, pattern = BAD_FLAGS[case]
    out = tmp_path / "out" / "run"
    code, stdout, err = run_cli(train_argv(text_file, out, cache_dir) + flags, capsys)
    assert code == 2
    one_error_line(err, pattern)
    assert not (tmp_path / "out").exists() and stdout == ""


def _toml_case(tmp_path, text_file, cache_dir, **changes):
    options = tiny_options(text_file, tmp_path / "out" / "run", cache_dir)
    options["model"] = {**options["model"], **changes.pop("model", {})}
    options.update(changes)
    return write_toml(tmp_path / "run.toml", options)


def test_toml_type_errors_name_the_file_and_key(tmp_path, text_file, cache_dir, capsys):
    toml = _toml_case(tmp_path, text_file, cache_dir, lr="fast")
    code, _, err = run_cli(["train", "--config", str(toml)], capsys)
    assert code == 2
    one_error_line(err, rf"{toml}: key 'lr' must be a number, got 'fast'")
    toml = _toml_case(tmp_path, text_file, cache_dir, model={"model_dim": "wide"})
    code, _, err = run_cli(["train", "--config", str(toml)], capsys)
    assert code == 2
    one_error_line(err, rf"{toml}: \[model\] key 'model_dim' must be an integer, got 'wide'")
    toml = _toml_case(tmp_path, text_file, cache_dir, data=3)
    code, _, err = run_cli(["train", "--config", str(toml)], capsys)
    assert code == 2
    one_error_line(err, rf"{toml}: key 'data' must be a list of strings, got 3")
    assert not (tmp_path / "out").exists()


def test_malformed_toml_names_the_file(tmp_path, capsys):
    toml = tmp_path / "broken.toml"
    toml.write_text('lr = 0.1\nmax_steps = = 3\n')
    code, _, err = run_cli(["train", "--config", str(toml), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    one_error_line(err, rf"{toml} is not valid TOML: .*line 2")
    assert not (tmp_path / "run").exists()


def test_invalid_json_in_a_run_file_names_it(run_copy, text_file, cache_dir, capsys):
    (run_copy / "train_config.json").write_text("{not json")
    code, _, err = run_cli(train_argv(text_file, run_copy, cache_dir, resume=True), capsys)
    assert code == 2
    one_error_line(err, r"cannot read .*train_config.json: ")


@pytest.mark.parametrize("argv", [["generate", "RUN", "--threads", "0"],
                                  ["eval", "ppl", "RUN", "--data", "DATA", "--threads", "-1"]])
def test_threads_of_generate_and_eval_are_validated(argv, finished_run, text_file, capsys):
    argv = [str(finished_run) if a == "RUN" else str(text_file) if a == "DATA" else a for a in argv]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    one_error_line(err, r"--threads must be an integer >= 1")


def test_grad_clip_zero_means_no_clipping(tmp_path, text_file, cache_dir):
    short = dict(max_steps=2, save_every=2, eval_every=2, lr=0.05)
    tiny_run(text_file, tmp_path / "off", cache_dir, grad_clip=0, **short)
    tiny_run(text_file, tmp_path / "huge", cache_dir, grad_clip=1e30, **short)
    tiny_run(text_file, tmp_path / "tight", cache_dir, grad_clip=1e-3, **short)
    off, huge, tight = (final_weights(tmp_path / n) for n in ("off", "huge", "tight"))
    assert all(torch.equal(off[k], huge[k]) for k in off)
    assert not all(torch.equal(off[k], tight[k]) for k in off)  # clipping does change this run
