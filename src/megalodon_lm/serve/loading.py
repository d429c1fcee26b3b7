"""Load what `megalodon-lm serve` serves: a run directory or a transformers (HF) model directory.

A run directory is read by `load_run`. An HF directory (config.json + model.safetensors, written by
`megalodon-lm export-hf`) is read here without transformers: its config fields are `MegalodonConfig`'s and
its weights are the `MegalodonLM` state dict under the prefix `model.`. The fingerprint names the model a
session's state belongs to: a state is only meaningful for the exact weights that produced it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..models import MegalodonConfig, MegalodonLM

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_PREFIX = "model."


def _load_hf_dir(path: Path) -> tuple[MegalodonLM, Any]:
    from ..hf.convert import _load_hf_dir_tokenizer

    try:
        raw = json.loads((path / HF_CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / HF_CONFIG} is not valid JSON: {exc}") from exc
    fields = {f.name for f in dataclasses.fields(MegalodonConfig)}
    model = MegalodonLM(MegalodonConfig.from_dict({k: v for k, v in raw.items() if k in fields}))
    if (path / HF_INDEX).is_file():
        shards = sorted(set(json.loads((path / HF_INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
    elif (path / HF_WEIGHTS).is_file():
        shards = [HF_WEIGHTS]
    else:
        raise FileNotFoundError(f"{path} has no {HF_WEIGHTS}")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_file(str(path / shard)))
    state = {k[len(HF_PREFIX):]: v for k, v in weights.items() if k.startswith(HF_PREFIX)}
    model.load_state_dict(state, strict=True)
    return model.eval(), _load_hf_dir_tokenizer(path, None)


def load_model_dir(path: str | Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[MegalodonLM, Any]:
    """(eval-mode MegalodonLM on `device` in `dtype`, tokenizer) from a run or an HF directory."""
    from ..training.checkpoint import MODEL_CONFIG_FILE, load_run

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model directory not found: {p}")
    if (p / MODEL_CONFIG_FILE).is_file():
        model, tok = load_run(p, device="cpu")
    elif (p / HF_CONFIG).is_file():
        model, tok = _load_hf_dir(p)
    else:
        raise FileNotFoundError(f"{p} is neither a megalodon-lm run directory ({MODEL_CONFIG_FILE}) nor a "
                                f"transformers model directory ({HF_CONFIG})")
    if not isinstance(model, MegalodonLM):
        raise ValueError(f"{p} holds a {type(model).__name__}; serve needs a Megalodon model (constant-size state)")
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), tok


def model_fingerprint(model: MegalodonLM, tokenizer: Any) -> str:
    """sha256 (hex, 16 characters) of the config, the tokenizer and a strided sample of every weight.

    Independent of device, thread count and load path; two different trainings of one config differ.
    """
    h = hashlib.sha256(model.config.to_json().encode())
    h.update(str(getattr(tokenizer, "fingerprint", lambda: repr(tokenizer))()).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float64)
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
