"""Shared helpers for the end-to-end training tests: a tiny model, tiny runs, subprocess CLI calls.

Every run here is deliberately minute (1 layer, 32-dim model, seq_len 32, batch 2, a handful of steps) so
that the whole end-to-end suite stays within a few tens of seconds on a busy 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import lzma
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "examples" / "tinyshakespeare.txt.xz"  # the example run's data, committed

TINY_MODEL: dict[str, Any] = {"num_layers": 1, "model_dim": 32, "z_dim": 16, "value_dim": 32, "num_heads": 1,
                              "ffn_hidden_dim": 64, "chunk_size": 16, "norm_num_groups": 4}
SEQ_LEN = 32
BATCH = 2
TOKENS_PER_STEP = SEQ_LEN * BATCH
LN2 = math.log(2)

# A few kilobytes of plain ASCII prose: a small, fully known validation text. Deterministic, no EOS inside.
_WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak tree and "
          "count the stars that fall into the silent river below ").split()


def make_text(n_bytes: int, seed: int = 0) -> str:
    """Deterministic pseudo-English ASCII text of exactly `n_bytes` bytes."""
    out, i, state = [], 0, seed * 7919 + 17
    while sum(len(w) + 1 for w in out) <= n_bytes + 1:
        state = (state * 1103515245 + 12345) % 2**31
        out.append(_WORDS[state % len(_WORDS)])
        i += 1
        if i % 12 == 0:
            out[-1] += ".\n"
    text = " ".join(out)
    return text[:n_bytes]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A real text file: the first 64 KB of Tiny Shakespeare."""
    path = tmp_path_factory.mktemp("data") / "train.txt"
    with lzma.open(SHAKESPEARE, "rb") as f:
        path.write_bytes(f.read(64 * 1024))
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenized-data cache for the session (cache keys include file stamps, so sharing is safe)."""
    return tmp_path_factory.mktemp("token-cache")


def tiny_options(data, out, cache, **overrides) -> dict[str, Any]:
    """Options for `megalodon_lm.train` giving a run of a few seconds at most."""
    options: dict[str, Any] = dict(
        data=[str(p) for p in (data if isinstance(data, (list, tuple)) else [data])],
        preset="nano", model=dict(TINY_MODEL), seq_len=SEQ_LEN, batch_size=BATCH, max_steps=6, warmup_steps=2,
        max_time="", eval_every=4, eval_tokens=64, save_every=2, keep_last=3, log_every=1, sample_tokens=0,
        progress="none", tensorboard=False, cache_dir=str(cache), out=str(out), threads=1, seed=0,
    )
    options.update(overrides)
    return options


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with `n` torch CPU threads and restore the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_tiny(data, out, cache, **overrides):
    """`megalodon_lm.train` with tiny options, single-threaded, restoring the caller's thread count."""
    import megalodon_lm

    with torch_threads(1):
        return megalodon_lm.train(None, **tiny_options(data, out, cache, **overrides))


@pytest.fixture
def single_thread():
    """Single-threaded torch for the test (exact comparisons with in-process runs), restored afterwards."""
    with torch_threads(1):
        yield


# ---------------------------------------------------------------------- metrics and checkpoints
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def train_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def eval_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "val_loss" in r]


def latest_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from megalodon_lm.training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    return load_file(str(ckpt / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"weights differ: {key}"


def checkpoint_steps(run_dir: Path) -> list[int]:
    from megalodon_lm.training.checkpoint import list_checkpoints

    return [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir)]


# ---------------------------------------------------------------------- CLI in a subprocess
def write_toml(path: Path, options: dict[str, Any]) -> Path:
    """A TOML run config: top-level scalars/lists, plus the `model` dict as a [model] table."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string

    lines = [f"{k} = {value(v)}" for k, v in options.items() if k != "model" and v is not None]
    if options.get("model"):
        lines.append("")
        lines.append("[model]")
        lines.extend(f"{k} = {value(v)}" for k, v in options["model"].items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env.pop("MEGALODON_LM_CACHE", None)
    return env


def cli(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m megalodon_lm ARGS` in a subprocess; text output captured."""
    return subprocess.run([sys.executable, "-m", "megalodon_lm", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=cwd)


def cli_popen(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megalodon_lm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=cwd)
