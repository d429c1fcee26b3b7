"""Per-row sampling for the batching engine: each request keeps its own options and CPU generator.

The generator's state is what a session persists between turns (`rng_state`/`generator_from_state`), so a
seeded conversation samples the same tokens whether or not the server restarted in between. The
filters are `megalodon_lm.generation.decoding`'s, applied to one row at a time.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from ..generation.decoding import _sample


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded by `seed`, or by fresh OS entropy when None."""
    return torch.Generator(device="cpu").manual_seed(secrets.randbits(63) if seed is None else seed)


def rng_bytes(generator: torch.Generator) -> bytes:
    """The generator's state as bytes (for the session store)."""
    return generator.get_state().numpy().tobytes()


def generator_from_bytes(data: bytes) -> torch.Generator:
    """Inverse of `rng_bytes`."""
    g = torch.Generator(device="cpu")
    g.set_state(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return g


@dataclass
class RowSampler:
    """Sampling options of one request. temperature 0 = greedy (the generator is not touched)."""

    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    generator: torch.Generator
    vocab_size: int
    seen: torch.Tensor | None = None  # (V,) bool: tokens of this turn, for the repetition penalty

    def __post_init__(self) -> None:
        if self.repetition_penalty not in (None, 1, 1.0) and self.seen is None:
            self.seen = torch.zeros(self.vocab_size, dtype=torch.bool)

    def observe(self, tokens: list[int]) -> None:
        """Count tokens as seen by the repetition penalty (the turn's prompt, then each sampled token)."""
        if self.seen is not None and tokens:
            self.seen[torch.as_tensor(tokens, dtype=torch.long)] = True

    def sample(self, logits: torch.Tensor) -> int:
        """(V,) CPU logits -> the next token id."""
        seen = None if self.seen is None else self.seen[None]
        token = int(_sample(logits[None], seen, self.temperature, self.top_k, self.top_p, self.repetition_penalty,
                            self.generator)[0])
        self.observe([token])
        return token
