"""Shared helpers for the model-layer tests: tiny configs, parameter noise, error measures."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megalodon_lm import MegalodonConfig, MegalodonLM

# tests/models/helpers.py -> tests/testdata/golden (committed with the tests; see its README.md).
GOLDEN = Path(__file__).resolve().parents[1] / "testdata" / "golden"
GOLDEN_MODELS = ("basic", "swiglu_tied_scaled", "one_head_odd_chunk")
BUFFER_SUFFIXES = ("prior_count", "prior_mean", "prior_logv")

CHUNK = 16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def nano_config(**overrides) -> MegalodonConfig:
    return MegalodonConfig.from_preset("nano", **{"chunk_size": CHUNK, **overrides})


@torch.no_grad()
def perturb_zero_init_(model: MegalodonLM, scale: float = 0.2, seed: int = 1234) -> MegalodonLM:
    """Give every parameter that the reference initialises to zero (biases, norm offsets, q/k affine,
    imaginary CEMA gamma) random values, so that misplaced or dropped terms change the output."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("cema.gamma"):
            p[..., 1].add_(torch.randn(p[..., 1].shape, generator=g, dtype=p.dtype) * scale)
        elif bool((p == 0).all()):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def nano_model(seed: int = 0, perturb: bool = True, **overrides) -> MegalodonLM:
    """A seconds-fast model (nano preset, chunk 16) in eval mode with non-trivial parameters."""
    torch.manual_seed(seed)
    model = MegalodonLM(nano_config(**overrides))
    if perturb:
        perturb_zero_init_(model, seed=seed + 1)
    return model.eval()


def random_ids(batch: int, length: int, vocab: int = 256, seed: int = 0, low: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (batch, length), generator=g)


def load_golden(name: str):
    """(config, {param name: tensor} without the `param.` prefix, input_ids, logits)."""
    from safetensors.torch import load_file

    cfg = MegalodonConfig.from_dict(json.loads((GOLDEN / f"{name}.json").read_text()))
    tensors = load_file(str(GOLDEN / f"{name}.safetensors"))
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    return cfg, params, tensors["input_ids"], tensors["logits"]
