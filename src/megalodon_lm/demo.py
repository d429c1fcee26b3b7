"""`megalodon-lm demo`: show exact constant-memory streaming on any machine, with no download.

Builds a randomly initialised model, feeds the same byte sequence three ways (one forward, pieces that
straddle chunk boundaries, token by token), checks that the logits agree, and reports the state size
and throughput. Until `megalodon-lm train` exists this is the project's main job on its embedded default.
"""

from __future__ import annotations

import inspect
import time

import torch

from .models import MegalodonConfig, MegalodonLM, StreamState


def default_text() -> bytes:
    """Embedded default input: this package's own source code (always present, real text)."""
    from . import models

    return inspect.getsource(models.megalodon).encode("utf-8")


def _stream(model: MegalodonLM, ids: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, StreamState]:
    """Feed ids (1, L) in pieces of the given sizes, carrying the state; returns logits and final state."""
    state, outs, start = None, [], 0
    for size in sizes:
        out = model(ids[:, start : start + size], state=state, return_state=True)
        state, start = out.state, start + size
        outs.append(out.logits)
    return torch.cat(outs, dim=1), state


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_demo(preset: str = "nano", length: int = 1000, seed: int = 0, print_fn=print) -> dict[str, float]:
    """Run the streaming demo; returns the measured numbers (also printed)."""
    torch.manual_seed(seed)
    cfg = MegalodonConfig.from_preset(preset)
    model = MegalodonLM(cfg).eval()
    data = default_text()
    data = (data * (length // max(1, len(data)) + 1))[:length]
    ids = torch.tensor(list(data), dtype=torch.long).view(1, -1)
    L, C = ids.shape[1], cfg.chunk_size
    print_fn(f"model: preset {preset!r}, {model.num_parameters():,} parameters, chunk_size {C}")
    print_fn(f"input: {L} bytes of this package's source code")

    results: dict[str, float] = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        full = model(ids).logits
        results["forward_tok_per_s"] = L / (time.perf_counter() - t0)
        pieces = [C // 2 + 1, C - 3, 2 * C + 5]
        sizes = []
        while sum(sizes) < L:
            sizes.append(min(pieces[len(sizes) % 3], L - sum(sizes)))
        streamed, state = _stream(model, ids, sizes)
        results["pieces_rel_err"] = _rel(streamed, full)
        t0 = time.perf_counter()
        by_token, state_tok = _stream(model, ids, [1] * L)
        results["token_by_token_tok_per_s"] = L / (time.perf_counter() - t0)
        results["token_by_token_rel_err"] = _rel(by_token, full)
        results["state_bytes"] = float(state_tok.nbytes())

        generated, st = [], state_tok
        nxt = full[:, -1].argmax(-1, keepdim=True)
        for _ in range(40):
            generated.append(int(nxt))
            out = model(nxt, state=st)
            st, nxt = out.state, out.logits[:, -1].argmax(-1, keepdim=True)

    print_fn(f"one forward:            {results['forward_tok_per_s']:9.0f} tokens/s")
    print_fn(f"streamed in pieces {sizes[:3]}...: rel. error vs one forward {results['pieces_rel_err']:.2e}")
    print_fn(f"token by token:         {results['token_by_token_tok_per_s']:9.0f} tokens/s, "
             f"rel. error {results['token_by_token_rel_err']:.2e}")
    print_fn(f"streaming state after {L} tokens: {results['state_bytes'] / 2**10:.1f} KiB "
             f"(bounded: no KV cache beyond the current {C}-token chunk)")
    text = bytes(generated).decode("utf-8", errors="replace")
    print_fn(f"greedy continuation of an untrained model (noise is expected): {text!r}")
    ok = results["pieces_rel_err"] < 1e-5 and results["token_by_token_rel_err"] < 1e-5
    print_fn("streaming is exact: " + ("yes" if ok else "NO (please report a bug)"))
    results["exact"] = float(ok)
    return results
