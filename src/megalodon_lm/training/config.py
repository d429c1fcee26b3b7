"""`TrainConfig`: every training option with its default, shared by the CLI, TOML files and the Python API.

Precedence: command-line flags > the TOML file (`--config`) > these defaults. The TOML file uses the
same names (underscores) at the top level and may hold a `[model]` table of `MegalodonConfig` field
overrides. The resolved configuration is saved in the run directory (train_config.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass
class TrainConfig:
    """Training options. Sizes in tokens; `batch_size` is per process (global batch = batch x ranks x accum)."""

    # model and data
    arch: str = "megalodon"  # megalodon | llama (HF LlamaForCausalLM matched to the preset's parameter count)
    preset: str = "3M"  # model preset (MegalodonConfig.from_preset); `[model]` in the TOML overrides fields
    data: list[str] = field(default_factory=list)  # files, directories, globs; empty = the stdlib .py corpus
    val_data: list[str] = field(default_factory=list)  # validation sources; empty = split off the training data
    tokenizer: str = "byte"  # "byte" or a path to a tokenizer.json / tokenizer directory
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    document_masking: bool = False  # EOS-separated documents in a window do not see each other (data/packing.py)
    # optimisation (AdamW on all parameters, as the reference; betas of the paper's 7B run)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # None: min(100, max_steps // 10); a given value above max_steps is an error
    max_steps: int = 2000
    max_time: str | None = "8m"  # wall-clock budget ("90s", "10m", "2h"; None = no limit); counts across resumes
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # evaluation, logging, checkpoints
    eval_every: int = 200
    eval_tokens: int = 131072  # validation targets scored per evaluation (evenly spread over every document)
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    sample_tokens: int = 300  # length of the text sample written at the end (0 = none)
    sample_prompt: str = "\n"  # prompt of that sample
    out: str | None = None  # run directory; default runs/megalodon-<date>-<time> (with --resume: the newest run)
    resume: bool = False
    init_from: str | None = None  # start from another run's weights (fresh optimizer)
    cache_dir: str | None = None  # tokenized-data cache (default ~/.cache/megalodon-lm)
    # execution
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 (autocast; master weights stay fp32)
    compile: bool = False
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    progress: str = "auto"  # auto (bar on a terminal, log lines otherwise) | bar | plain | none
    tensorboard: bool = True  # also write TensorBoard logs when tensorboard is installed
    # distributed (under torchrun; see docs/distributed.md)
    parallel: str = "auto"  # auto (ddp with several processes) | ddp | fsdp | none
    chunk_parallel: int = 1  # K ranks share each sequence, K contiguous pieces (Megalodon's chunk parallelism)
    activation_checkpointing: bool = False  # recompute each block in the backward (less memory, ~1/3 more compute)
    memory_check: bool = True  # refuse a model that cannot fit in memory before building it (training/memory.py)
    model: dict[str, Any] = field(default_factory=dict)  # MegalodonConfig overrides (TOML [model])

    def validate(self) -> None:
        """One clear error per bad option, before any work starts (nothing is written before this passes)."""
        check_types(self.__dict__, TrainConfig, None)
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "keep_last",
                    "log_every", "eval_tokens")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.warmup_steps is None:  # the default scales down for short runs; an explicit value is kept
            self.warmup_steps = min(100, int(self.max_steps) // 10)
        if self.warmup_steps < 0 or self.sample_tokens < 0:
            raise ValueError("--warmup-steps and --sample-tokens must be >= 0")
        if isinstance(self.max_time, str) and self.max_time.strip().lower() in ("", "none"):
            self.max_time = None  # "none" on the command line (or in the API) means no time limit
        if self.max_time is not None:
            from .metrics import parse_duration

            parse_duration(self.max_time)  # "--max-time 10x" fails here, before anything is written
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"--warmup-steps ({self.warmup_steps}) must not exceed --max-steps ({self.max_steps})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must lie in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must lie in [0, 1), got {getattr(self, name)}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"--eps must be a positive number, got {self.eps}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"--weight-decay must be a number >= 0, got {self.weight_decay}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"--grad-clip must be a positive number, or 0 for no clipping; got {self.grad_clip}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"--dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.arch not in ("megalodon", "llama"):
            raise ValueError(f"--arch must be megalodon or llama, got {self.arch!r}")
        if self.arch == "llama" and (self.document_masking or self.chunk_parallel != 1):
            raise ValueError("--arch llama supports neither --document-masking nor --chunk-parallel (Megalodon only)")
        if self.progress not in ("auto", "bar", "plain", "none"):
            raise ValueError(f"--progress must be auto, bar, plain or none, got {self.progress!r}")
        if self.resume and self.init_from:
            raise ValueError("--resume continues a run; --init-from starts a new one from weights: pick one")
        if self.parallel not in ("auto", "ddp", "fsdp", "none"):
            raise ValueError(f"--parallel must be auto, ddp, fsdp or none, got {self.parallel!r}")
        if isinstance(self.chunk_parallel, bool) or int(self.chunk_parallel) < 1:
            raise ValueError(f"--chunk-parallel must be >= 1, got {self.chunk_parallel}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RUNS_ROOT = Path("runs")


def default_run_dir(resume: bool, root: Path = RUNS_ROOT) -> Path:
    """A new timestamped directory under runs/, or with resume the newest run there that has a checkpoint."""
    if not resume:
        return root / time.strftime("megalodon-%Y%m%d-%H%M%S")
    runs = sorted((p for p in root.glob("megalodon-*") if (p / "checkpoints").is_dir()), key=lambda p: p.name)
    if not runs:
        raise FileNotFoundError(f"--resume without --out: no run with checkpoints under {root}/")
    return runs[-1]


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


_KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
          "list[str]": "a list of strings", "dict[str, Any]": "a table"}


_ALSO = {"max_time": "float"}  # a duration may also be given as a number of seconds


def _type_ok(annotation: str, value: Any) -> bool:
    """Does `value` fit a dataclass field annotation ("int", "str | None", "list[str]", ...)?"""
    if annotation.endswith(" | None"):
        return value is None or _type_ok(annotation[: -len(" | None")], value)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, (str, os.PathLike))
    if annotation == "list[str]":
        return isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value)
    if annotation.startswith("dict"):
        return isinstance(value, dict)
    return True  # an annotation this checker does not know: left to the field's own validation


def check_types(values: dict[str, Any], cls: type, source: Path | None) -> None:
    """TypeError naming the option (and the TOML file it came from) whose value has the wrong type."""
    annotations = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in values.items():
        annotation = annotations.get(key)
        if annotation is None or _type_ok(annotation, value) or (key in _ALSO and _type_ok(_ALSO[key], value)):
            continue
        base = annotation.replace(" | None", "")
        kind = _KINDS.get(base, base) + (" (or omitted)" if annotation.endswith("| None") else "")
        where = f"{source}: key {key!r}" if source is not None else f"--{key.replace('_', '-')}"
        if cls is not TrainConfig:
            where = f"{source}: [model] key {key!r}" if source is not None else f"model.{key}"
        raise TypeError(f"{where} must be {kind}, got {value!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML run config; unknown keys, wrong types and malformed TOML are errors naming the file."""
    from ..models import MegalodonConfig

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{p} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ValueError(f"cannot read {p}: {exc.strerror or exc}") from exc
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise ValueError(f"unknown key(s) in {p}: {', '.join(unknown)}")
    check_types(data, TrainConfig, p)
    model = data.get("model", {})
    unknown = sorted(set(model) - {f.name for f in dataclasses.fields(MegalodonConfig)})
    if unknown:
        raise ValueError(f"unknown key(s) in the [model] table of {p}: {', '.join(unknown)}")
    check_types(model, MegalodonConfig, p)
    return data


# Options a resumed run may change: they affect where and how it runs, not what it computes, except --max-steps and
# --max-time, which extend it (training/resume.py recomputes the schedule's horizon).
RESUME_MAY_CHANGE = frozenset({"resume", "out", "progress", "threads", "device", "tensorboard", "cache_dir",
                               "max_steps", "max_time", "log_every", "keep_last", "eval_every", "save_every",
                               "sample_tokens", "sample_prompt", "parallel", "chunk_parallel",
                               "activation_checkpointing", "memory_check"})


def resolve_resume_config(overrides: dict[str, Any], toml_path: str | Path | None = None) -> TrainConfig:
    """The saved options of the run being resumed, with only run-time options overridable.

    Anything that would change the computation (data, model, schedule, batch, seed, ...) must match the
    saved value: a resumed run continues exactly, and a different run is a new one (--init-from).
    """
    if overrides.get("init_from"):
        raise ValueError("--resume continues a run; --init-from starts a new one from weights: pick one")
    given = load_toml(toml_path) if toml_path else {}
    given.update({k: v for k, v in overrides.items() if v is not None})
    out = given.get("out")  # a flag, else the TOML's `out`
    run_dir = Path(out) if out else default_run_dir(resume=True)
    saved_path = run_dir / "train_config.json"
    from .checkpoint import latest_checkpoint, read_json_file

    if latest_checkpoint(run_dir) is None or not saved_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}")
    saved = read_json_file(saved_path)
    if not isinstance(saved, dict):
        raise ValueError(f"{saved_path} does not hold a training configuration")
    unknown = sorted(set(given) - set(field_names()))
    if unknown:
        raise TypeError(f"unknown training option(s): {', '.join(unknown)}")
    for key, value in given.items():
        if key not in RESUME_MAY_CHANGE and json.loads(json.dumps(value)) != saved.get(key):
            raise ValueError(f"--{key.replace('_', '-')} {value!r} differs from the resumed run's {saved.get(key)!r}: "
                             "a resumed run keeps its options (start a new run with --init-from to change them)")
    merged = {**saved, **{k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}}
    merged.update(resume=True, out=str(run_dir), init_from=None)
    cfg = TrainConfig(**{k: v for k, v in merged.items() if k in field_names()})
    cfg.validate()
    return cfg


def resolve_config(overrides: dict[str, Any], toml_path: str | Path | None = None) -> TrainConfig:
    """Defaults <- TOML file <- explicit overrides (None values mean "not given")."""
    merged: dict[str, Any] = load_toml(toml_path) if toml_path else {}
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        raise TypeError(f"unknown training option(s): {', '.join(unknown)}")
    merged.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**merged)
    cfg.validate()
    return cfg
