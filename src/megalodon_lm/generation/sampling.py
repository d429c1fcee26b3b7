"""Next-token sampling, one row at a time, each row from its own random stream.

A row's tokens depend only on its own logits and its own generator, never on which other rows share the
batch: `generate(model, [a, b], seed=s)` gives row a exactly what `generate(model, [a], seed=s)` gives (up to
float rounding of the logits in a batched forward). One generator for the whole batch cannot promise that:
a multinomial draw over a (B, V) batch takes its random numbers for all rows from one stream, so a row's
draws depend on how many rows came before it.

`row_generators` turns a `seed` argument into one generator per row; `sample_rows` samples (B, V) logits
with them. A server that batches independent requests keeps one generator per request and calls
`sample_rows` (or `sample_rows(logits[None], [g])` per request) with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Seed = int | torch.Generator | None
RowSeeds = Seed | Sequence[int | torch.Generator]


def _check_generator(g: torch.Generator) -> torch.Generator:
    if g.device.type != "cpu":
        raise ValueError(f"seed must be a CPU torch.Generator (sampling runs on the CPU), got {g.device}")
    return g


def row_generators(seed: RowSeeds, batch: int) -> list[torch.Generator | None]:
    """One CPU generator (or None = torch's global RNG) per row.

    - an int: a fresh generator seeded with it for every row, so each row samples what it samples alone with
      that seed (identical prompts therefore give identical samples: pass one seed per row for variety);
    - a torch.Generator: that one generator for every row, advanced in place, rows drawing in turn (with one
      row, continuing the generator continues the stream exactly);
    - a sequence of B ints / generators: row b uses the b-th (generators are advanced in place, so passing the
      same list to a later call continues every row's stream);
    - None: torch's global RNG, rows drawing in turn.
    """
    if seed is None:
        return [None] * batch
    if isinstance(seed, torch.Generator):
        return [_check_generator(seed)] * batch
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an int, a torch.Generator, a sequence of those or None, got {seed!r}")
    if isinstance(seed, int):
        return [torch.Generator(device="cpu").manual_seed(seed) for _ in range(batch)]
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"seed holds {len(seed)} per-row seeds, but there are {batch} prompts")
        out = []
        for s in seed:
            if isinstance(s, torch.Generator):
                out.append(_check_generator(s))
            elif isinstance(s, int) and not isinstance(s, bool):
                out.append(torch.Generator(device="cpu").manual_seed(s))
            else:
                raise TypeError(f"per-row seeds must be ints or torch.Generators, got {s!r}")
        return out
    raise TypeError(f"seed must be an int, a torch.Generator, a sequence of those or None, got {seed!r}")


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty: seen tokens' positive logits / penalty, negative ones x penalty. (B, V)."""
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Top-k, then nucleus: (B, V) logits with the dropped tokens at -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        probs, order = torch.sort(torch.softmax(logits, -1), dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p: the smallest set whose
        # mass is >= top_p survives, and the top token always does (its exclusive sum is 0 < top_p).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_rows(logits: torch.Tensor, generators: Seed | Sequence[torch.Generator | None], temperature: float,
                top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) CPU logits -> (B,) int64 next tokens; row b draws from `generators[b]` only.

    generators: one per row (see `row_generators`), or a single generator / None used for every row in turn.
    temperature 0 is greedy (no generator is touched). The logits go through repetition_penalty (over `seen`,
    (B, V) bool), / temperature, top_k, top_p, then a multinomial draw.
    """
    if repetition_penalty is not None and repetition_penalty != 1:
        logits = penalise(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(-1)
    if generators is None or isinstance(generators, torch.Generator):
        generators = [generators] * logits.shape[0]
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), -1)
    # Row by row: a (B, V) multinomial would take every row's random numbers from one stream in turn.
    return torch.cat([torch.multinomial(probs[b : b + 1], 1, generator=generators[b])[:, 0]
                      for b in range(probs.shape[0])])
