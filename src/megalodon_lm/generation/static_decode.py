"""Single-token decoding with fixed-shape state, for `torch.compile` (and CUDA graphs), as gpt-fast does.

`MegalodonLM.forward` keeps each layer's attention cache as exactly the tokens of the current partial
chunk, so its shape changes every step and rows at different chunk offsets take separate SDPA calls.
Here every layer holds a (B, H, C, d) key/value buffer, a token is written into slot `offset` of its
row and attends to the slots 0..offset; the CEMA state is two real planes (inductor does not fuse
complex arithmetic). Every shape is fixed for the whole generation, so one compiled graph serves every
step. The math is the model's, step for step (tested against `MegalodonLM.forward` in float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.megalodon import MegalodonLM
from ..models.state import StreamState
from ..modules.mega import MegaLayerState
from ..ops._dtypes import compute_dtype
from ..ops.rope import apply_rope

# Per layer: norm count, mean, var; CEMA state real, imaginary; key buffer, value buffer.
_PER_LAYER = 7


class StaticDecoder:
    """Decode B streams one token per call with fixed-shape state.

    decoder = StaticDecoder(model, state)    # state: a StreamState (e.g. after prefill), eval mode
    logits = decoder.step(tokens)            # tokens (B,) int64 -> logits (B, V); valid (B,) bool optional
    state = decoder.stream_state()           # back to a StreamState, equal to the model's own
    `compile=True` wraps the step in `torch.compile(fullgraph=True)`: the first call compiles (tens of
    seconds on CPU), later calls reuse the graph.
    """

    def __init__(self, model: MegalodonLM, state: StreamState, compile: bool = False) -> None:
        if not isinstance(state, StreamState):
            raise TypeError(f"state must be a StreamState, got {type(state).__name__}")
        if model.training:
            raise ValueError("StaticDecoder needs the model in eval mode (model.eval()): no dropout in decoding")
        cfg = model.config
        self.model, self.chunk_size = model, cfg.chunk_size
        C = cfg.chunk_size
        with torch.no_grad():
            self._coefs = []
            for block in model.layers:
                c = block.mega.cema.coefficients()
                self._coefs.append((c.p, c.q.real.contiguous(), c.q.imag.contiguous(), c.eta.real.contiguous(),
                                    c.eta.imag.contiguous(), c.omega))
        self._tensors = _fixed_shape(state, C)
        self._positions = state.positions.clone()
        self._cema_dtype = state.layers[0].cema.dtype if state.layers else None
        self._step = _compiled_step() if compile else _eager_step

    @property
    def positions(self) -> torch.Tensor:
        """(B,) tokens consumed so far per row."""
        return self._positions

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B,) int64 -> logits (B, V) of the next token; rows with valid False keep their state."""
        B = self._positions.shape[0]
        if tokens.shape != (B,):
            raise ValueError(f"tokens must have shape ({B},), got {tuple(tokens.shape)}")
        if valid is None:
            valid = torch.ones(B, dtype=torch.bool, device=tokens.device)
        logits, self._tensors = self._step(self.model, self._coefs, tokens, valid, self._positions % self.chunk_size,
                                           self._tensors)
        self._positions = self._positions + valid.long()
        return logits

    @property
    def batch_size(self) -> int:
        return int(self._positions.shape[0])

    def stream_state(self) -> StreamState:
        """The equivalent `StreamState` (cache trimmed to the longest partial chunk, zeros past each row's)."""
        return self._stream_state(self._tensors, self._positions)

    # ------------------------------------------------------------------ rows joining and leaving
    # Continuous batching (megalodon_lm.serve): streams join and leave between steps. Rows are independent
    # in every operation of the step, so moving a row in or out changes nothing for the others.
    def add_rows(self, state: StreamState) -> None:
        """Append the rows of `state` (e.g. a freshly prefilled stream) after the current rows."""
        if not isinstance(state, StreamState):
            raise TypeError(f"state must be a StreamState, got {type(state).__name__}")
        new = _fixed_shape(state.to(self._positions.device), self.chunk_size)
        self._tensors = [torch.cat([old, t]) for old, t in zip(self._tensors, new, strict=True)]
        self._positions = torch.cat([self._positions, state.positions.to(self._positions.device)])

    def remove_rows(self, rows: list[int]) -> StreamState:
        """Take `rows` out of the batch; returns their `StreamState` (in the order given)."""
        B = self.batch_size
        index = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= B):
            raise IndexError(f"rows {rows} out of range for batch size {B}")
        dev = self._positions.device
        index = index.to(dev)
        taken = self._stream_state([t.index_select(0, index) for t in self._tensors], self._positions[index])
        keep = torch.ones(B, dtype=torch.bool, device=dev)
        keep[index] = False
        self._tensors = [t[keep] for t in self._tensors]
        self._positions = self._positions[keep]
        return taken

    def _stream_state(self, tensors: list[torch.Tensor], positions: torch.Tensor) -> StreamState:
        B, C = positions.shape[0], self.chunk_size
        offsets = positions % C
        r = int(offsets.max()) if B else 0
        keep = (torch.arange(r, device=offsets.device) < offsets.unsqueeze(1)).view(B, r, 1, 1)
        layers = []
        for i in range(len(self.model.layers)):
            count, mean, var, h_re, h_im, kb, vb = tensors[i * _PER_LAYER:(i + 1) * _PER_LAYER]
            cema = torch.complex(h_re, h_im).to(self._cema_dtype)
            layers.append(MegaLayerState((count.round().long(), mean.clone(), var.clone()), cema,
                                         kb[:, :, :r].transpose(1, 2) * keep, vb[:, :, :r].transpose(1, 2) * keep))
        count, mean, var = tensors[-3:]
        return StreamState(layers, (count.round().long(), mean.clone(), var.clone()), positions.clone())


def _fixed_shape(state: StreamState, chunk_size: int) -> list[torch.Tensor]:
    """A StreamState as the decoder's flat list of fixed-shape tensors (see _PER_LAYER)."""
    B, C = state.batch_size, chunk_size
    tensors: list[torch.Tensor] = []
    for ls in state.layers:
        count, mean, var = ls.norm
        n = ls.attn_k.shape[1]
        # (B, H, C, d): batch and heads merge into one bmm batch dimension without a copy.
        kb = ls.attn_k.new_zeros(B, ls.attn_k.shape[2], C, ls.attn_k.shape[3])
        vb = ls.attn_v.new_zeros(B, ls.attn_v.shape[2], C, ls.attn_v.shape[3])
        kb[:, :, :n], vb[:, :, :n] = ls.attn_k.transpose(1, 2), ls.attn_v.transpose(1, 2)
        tensors += [count.to(mean.dtype), mean, var, ls.cema.real.contiguous(), ls.cema.imag.contiguous(), kb, vb]
    count, mean, var = state.final_norm
    return [*tensors, count.to(mean.dtype), mean, var]


_COMPILED: list = []


def _compiled_step():
    """One `torch.compile` of the step per process: dynamo caches a graph per model and shapes, so a new
    decoder for the same model and batch size reuses it instead of compiling again."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_decode_step, fullgraph=True, dynamic=False))
    return _COMPILED[0]


def _eager_step(model, coefs, tokens, valid, offsets, tensors):
    """Uncompiled: the key/value buffers are updated in place and attention reads only the slots in use."""
    return _decode_step(model, coefs, tokens, valid, offsets, tensors, eager=True)


def _decode_step(model: MegalodonLM, coefs: list, tokens: torch.Tensor, valid: torch.Tensor, offsets: torch.Tensor,
                 tensors: list[torch.Tensor], eager: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The whole model for one token per row (pure tensor code): tokens (B,) -> (logits (B, V), new state).
    eager=True (not for torch.compile): the same math with in-place buffer writes, see `_mega_step`."""
    x = model.embed(tokens)  # (B, D)
    if model.emb_scale != 1.0:
        x = x * model.emb_scale
    new: list[torch.Tensor] = []
    for i, block in enumerate(model.layers):
        state = tensors[i * _PER_LAYER:(i + 1) * _PER_LAYER]
        y, layer_state = _mega_step(block.mega, coefs[i], model.rope.freqs, x, valid, offsets, state, eager)
        x = block.nffn(y.unsqueeze(1), residual=x.unsqueeze(1)).squeeze(1)
        new += layer_state
    norm = model.output.final_norm
    x, stats = _timestep_norm_step(x, norm.weight, norm.bias, norm.num_groups, norm.eps, valid, *tensors[-3:])
    logits = F.linear(x, model.output_weight)
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    return logits, [*new, *stats]


def _mega_step(mega, coefs: tuple, freqs: torch.Tensor, x: torch.Tensor, valid: torch.Tensor, offsets: torch.Tensor,
               state: list[torch.Tensor], eager: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The MEGA sub-layer (modules/mega.py) for one token per row: x (B, D) -> (x + h, new state)."""
    count, mean, var, h_re, h_im, kb, vb = state
    B = x.shape[0]
    H, dz, dv, C = mega.num_heads, mega.head_dim, mega.value_head_dim, mega.chunk_size
    tn = mega.timenorm
    xn, (count, mean, var) = _timestep_norm_step(x, tn.weight, tn.bias, tn.num_groups, tn.eps, valid,
                                                 count, mean, var)
    mx, h_re, h_im = _cema_step(xn, coefs, h_re, h_im, valid)
    mx = mega.rmsnorm(mx)

    z = mega.wz(mx).view(B, 1, H, dz)
    zf = z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
    z = (zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + mega.eps)).to(z.dtype)
    scale = ((mega.gamma + 1) / math.sqrt(dz)).view(2, 1, 1, H, dz)
    offset = mega.beta.view(2, 1, 1, H, dz)
    q, k = (z * scale[0] + offset[0]).to(z.dtype), (z * scale[1] + offset[1]).to(z.dtype)
    v = F.silu(mega.wv(xn)).view(B, H, dv)
    r = F.silu(mega.wr(mx))

    qk = apply_rope(torch.cat([q, k], dim=2), offsets.view(B, 1), freqs)  # (B, 1, 2H, dz)
    q, k = qk[:, 0, :H], qk[:, 0, H:]
    if eager:
        # In place: a functional update would allocate and write both whole (B, C, H, d) buffers per layer per
        # step, which dominated the step at batch 8 on CPU. Attention then reads only slots 0..max offset.
        rows = torch.arange(B, device=x.device)
        keep = valid.view(B, 1, 1)
        kb[rows, :, offsets] = torch.where(keep, k, kb[rows, :, offsets])
        vb[rows, :, offsets] = torch.where(keep, v, vb[rows, :, offsets])
        C = int(offsets.max()) + 1 if B else 1
        k_used, v_used = kb[:, :, :C], vb[:, :, :C]
    else:
        slots = torch.arange(C, device=x.device)
        write = ((slots.unsqueeze(0) == offsets.unsqueeze(1)) & valid.unsqueeze(1)).view(B, 1, C, 1)
        kb = torch.where(write, k.unsqueeze(2), kb)
        vb = torch.where(write, v.unsqueeze(2), vb)
        k_used, v_used = kb, vb
    slots = torch.arange(C, device=x.device)
    dt = compute_dtype(q)
    scores = torch.einsum("bhd,bhcd->bhc", q.to(dt), k_used.to(dt))  # no 1/sqrt(d): folded into the q/k affine
    visible = (slots.unsqueeze(0) <= offsets.unsqueeze(1)).unsqueeze(1)  # (B, 1, C)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.einsum("bhc,bhcd->bhd", probs, v_used.to(dt)).to(v.dtype)

    h = mega.wh1(mx) + mega.wh2(out.reshape(B, H * dv) * r)
    return x + h, [count, mean, var, h_re, h_im, kb, vb]


def _timestep_norm_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
                        valid: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
    """One Welford merge per row (ops/timestep_norm/naive.py): x (B, D), count (B,) float, mean/var (B, G)."""
    B, D = x.shape
    dt = mean.dtype
    xg = x.to(dt).view(B, num_groups, D // num_groups)
    v_t, m_t = torch.var_mean(xg, dim=-1, correction=0)
    w = valid.to(dt).unsqueeze(1)
    c = count.unsqueeze(1)
    c_new = c + w
    safe = c_new.clamp(min=1)
    keep, add = c / safe, w / safe
    mean_new = torch.where(w > 0, keep * mean + add * m_t, mean)
    var_new = torch.where(w > 0, keep * var + add * v_t + keep * add * (m_t - mean).pow(2), var)
    y = (xg - mean_new.unsqueeze(-1)) * torch.rsqrt(var_new.unsqueeze(-1) + eps)
    y = y.reshape(B, D) * (weight.to(dt) + 1) + bias.to(dt)
    return y.to(x.dtype), (c_new.squeeze(1), mean_new, var_new)


def _cema_step(x: torch.Tensor, coefs: tuple[torch.Tensor, ...], h_re: torch.Tensor, h_im: torch.Tensor,
               valid: torch.Tensor):
    """h' = p x + q h; y = Re(sum_n eta_n h'_n) + omega x, in real arithmetic. x (B, D); h (B, D, N)."""
    p, q_re, q_im, eta_re, eta_im, omega = coefs
    xf = x.to(p.dtype)
    px = p * xf.unsqueeze(-1)
    new_re = px + q_re * h_re - q_im * h_im
    new_im = q_re * h_im + q_im * h_re
    keep = valid.view(-1, 1, 1)
    h_re, h_im = torch.where(keep, new_re, h_re), torch.where(keep, new_im, h_im)
    y = (eta_re * h_re - eta_im * h_im).sum(-1) + omega * xf
    return y.to(x.dtype), h_re, h_im
