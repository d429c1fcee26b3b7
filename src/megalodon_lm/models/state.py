"""`StreamState`: everything a Megalodon model carries from one segment of a stream to the next.

Per layer: TimestepNorm (count, mean, var), the complex CEMA state, and the rotated keys/values of the
current partial attention chunk (fewer than chunk_size tokens). Plus the final norm's statistics and
each row's position (real tokens consumed so far). Its size does not grow with the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modules.mega import MegaLayerState

NormStats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class StreamState:
    """Streaming state of a `MegalodonLM` for a batch of B independent streams."""

    layers: list[MegaLayerState]
    final_norm: NormStats
    positions: torch.Tensor  # (B,) int64

    # ------------------------------------------------------------------ basic facts
    @property
    def batch_size(self) -> int:
        return int(self.positions.shape[0])

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def nbytes(self) -> int:
        """Total bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.to_dict().values())

    # ------------------------------------------------------------------ transforms
    def _map(self, fn) -> StreamState:
        layers = [
            MegaLayerState(tuple(fn(t) for t in ls.norm), fn(ls.cema), fn(ls.attn_k), fn(ls.attn_v))
            for ls in self.layers
        ]
        return StreamState(layers, tuple(fn(t) for t in self.final_norm), fn(self.positions))

    def detach(self) -> StreamState:
        """Same values, cut from the autograd graph (e.g. truncated backprop through time)."""
        return self._map(lambda t: t.detach())

    def clone(self) -> StreamState:
        """A deep copy (keeps autograd history, like `Tensor.clone`)."""
        return self._map(lambda t: t.clone())

    def to(self, device: torch.device | str) -> StreamState:
        """Move every tensor to `device` (dtypes unchanged)."""
        return self._map(lambda t: t.to(device))

    # ------------------------------------------------------------------ rows
    @classmethod
    def stack(cls, states: list[StreamState]) -> StreamState:
        """Rows of several states (same model) as one batch, in order: sum of batch sizes rows.

        Attention caches of different lengths are zero-padded to the longest: a row uses only the first
        positions % chunk_size cached tokens, so the padding is never read.
        """
        if not states:
            raise ValueError("StreamState.stack needs at least one state")
        n_layers = {len(s.layers) for s in states}
        if len(n_layers) != 1:
            raise ValueError(f"StreamState.stack: states have different numbers of layers {sorted(n_layers)}")

        def cat_cache(ts: list[torch.Tensor]) -> torch.Tensor:
            n = max(t.shape[1] for t in ts)
            return torch.cat([torch.nn.functional.pad(t, (0, 0, 0, 0, 0, n - t.shape[1])) for t in ts])

        layers = []
        for i in range(len(states[0].layers)):
            per = [s.layers[i] for s in states]
            norm = tuple(torch.cat([ls.norm[j] for ls in per]) for j in range(3))
            layers.append(MegaLayerState(norm, torch.cat([ls.cema for ls in per]),
                                         cat_cache([ls.attn_k for ls in per]), cat_cache([ls.attn_v for ls in per])))
        final = tuple(torch.cat([s.final_norm[j] for s in states]) for j in range(3))
        return cls(layers, final, torch.cat([s.positions for s in states]))

    def select(self, rows: torch.Tensor | list[int], chunk_size: int | None = None) -> StreamState:
        """The state of `rows` (a list or 1-D tensor of row indices), as a new batch (copies).

        chunk_size: also trim the attention caches to the longest partial chunk among those rows, so a row
        taken out of a batch is as small as if it had run alone (its cache length is positions % chunk_size).
        """
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1)
        out = self._map(lambda t: t.index_select(0, index))
        if chunk_size is None:
            return out
        keep = int((out.positions % chunk_size).max()) if out.batch_size else 0
        out.layers = [ls._replace(attn_k=ls.attn_k[:, :keep].clone(), attn_v=ls.attn_v[:, :keep].clone())
                      for ls in out.layers]
        return out

    def with_reset(self, fresh: StreamState, cema: bool = False, norm: bool = False) -> StreamState:
        """This state with chosen memory paths taken from `fresh` (e.g. `model.init_state(B)`).

        cema: every layer's CEMA hidden state; norm: every TimestepNorm's running statistics (each layer's and
        the final norm's). The attention's partial chunk and the positions are kept: attention never looks
        past its chunk, so at a chunk boundary (empty partial chunk) resetting both equals a fresh stream.
        """
        layers = [
            MegaLayerState(f.norm if norm else ls.norm, f.cema if cema else ls.cema, ls.attn_k, ls.attn_v)
            for ls, f in zip(self.layers, fresh.layers, strict=True)
        ]
        return StreamState(layers, fresh.final_norm if norm else self.final_norm, self.positions)

    # ------------------------------------------------------------------ flat dict form
    def to_dict(self) -> dict[str, torch.Tensor]:
        """Flat {name: tensor} (complex CEMA states as real (..., 2)), e.g. for safetensors files."""
        out: dict[str, torch.Tensor] = {"positions": self.positions}
        out["final_norm.count"], out["final_norm.mean"], out["final_norm.var"] = self.final_norm
        for i, ls in enumerate(self.layers):
            p = f"layers.{i}."
            out[p + "norm.count"], out[p + "norm.mean"], out[p + "norm.var"] = ls.norm
            out[p + "cema"] = torch.view_as_real(ls.cema)
            out[p + "attn_k"], out[p + "attn_v"] = ls.attn_k, ls.attn_v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> StreamState:
        """Inverse of `to_dict`. Raises ValueError naming a missing or malformed entry."""
        def get(name: str) -> torch.Tensor:
            if name not in d:
                raise ValueError(f"StreamState.from_dict: missing entry {name!r}")
            return d[name]

        n_layers = 0
        while f"layers.{n_layers}.cema" in d:
            n_layers += 1
        layers = []
        for i in range(n_layers):
            p = f"layers.{i}."
            cema = get(p + "cema")
            if cema.shape[-1] != 2 or not cema.is_floating_point():
                raise ValueError(f"StreamState.from_dict: {p}cema must be a real (..., 2) tensor")
            layers.append(MegaLayerState(
                (get(p + "norm.count"), get(p + "norm.mean"), get(p + "norm.var")),
                torch.view_as_complex(cema.contiguous()), get(p + "attn_k"), get(p + "attn_v"),
            ))
        final = (get("final_norm.count"), get("final_norm.mean"), get("final_norm.var"))
        return cls(layers, final, get("positions"))
