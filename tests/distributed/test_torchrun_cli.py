"""End to end through torchrun: `torchrun --nproc-per-node 2 -m megalodon_lm train --chunk-parallel 2` gives the
same training curve as one process on the whole sequences, and a run directory that generation reads."""

from __future__ import annotations

import json
import subprocess
import sys

from training.conftest import cli_env, run_tiny, tiny_options, train_lines, write_toml

from megalodon_lm.training.checkpoint import latest_checkpoint, load_run

from .launch import free_port


def test_torchrun_chunk_parallel_matches_one_process(tmp_path, text_file, cache_dir):
    short = dict(max_steps=4, warmup_steps=1, eval_every=4, save_every=4, threads=1)
    options = tiny_options(text_file, tmp_path / "run", cache_dir, **short)
    config = write_toml(tmp_path / "run.toml", options)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megalodon_lm", "train", "--config", str(config), "--chunk-parallel", "2", "--parallel", "ddp",
           "--activation-checkpointing"]
    env = {**cli_env(), "MEGALODON_DIST_TIMEOUT": "60"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("stopped by max_steps at step 4") == 1  # rank 0 alone reports
    ckpt = latest_checkpoint(tmp_path / "run")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["world_size"], state["chunk_parallel"], state["parallel"]) == (2, 2, "ddp")

    single = tmp_path / "single"
    run_tiny(text_file, single, cache_dir, **short)
    a, b = train_lines(tmp_path / "run"), train_lines(single)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * rb["loss"]
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-4 * rb["grad_norm"]
    model, _ = load_run(tmp_path / "run")  # consolidated at the end of the run
    assert model.num_parameters() > 0
