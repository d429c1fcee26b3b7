"""StaticDecoder: fixed-shape single-token decoding equals the model's own streaming, exactly."""

from __future__ import annotations

import pytest
import torch

from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.generation.static_decode import StaticDecoder

from .helpers import SMALL


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def _model(dtype=torch.float64, **overrides) -> MegalodonLM:
    torch.manual_seed(1)
    cfg = MegalodonConfig.from_preset("nano", **{**SMALL, **overrides})
    return MegalodonLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("prefill", [0, 1, 7, 8, 9])
@torch.no_grad()
def test_matches_whole_sequence_forward(prefill):
    """Prefill `prefill` tokens through the model, then decode the rest one token at a time with the
    static decoder across several chunk boundaries (chunk 8): logits equal one whole forward (rel 1e-10)."""
    model = _model()
    L = 21
    ids = torch.randint(0, model.config.vocab_size, (2, L), generator=torch.Generator().manual_seed(prefill))
    full = model(ids).logits
    state = model(ids[:, :prefill], return_state=True).state if prefill else model.init_state(2)
    dec = StaticDecoder(model, state)
    steps = torch.stack([dec.step(ids[:, t]) for t in range(prefill, L)], dim=1)
    assert rel(steps, full[:, prefill:]) <= 1e-10
    ref_state = model(ids, return_state=True).state
    got = dec.stream_state()
    for name, a in got.to_dict().items():
        b = ref_state.to_dict()[name]
        assert a.shape == b.shape, name
        assert a.dtype == b.dtype, name
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name


@torch.no_grad()
def test_rows_at_different_offsets_and_frozen_rows():
    """Rows whose streams are at different chunk offsets decode together; a row with valid=False keeps its
    state and position (finished rows in `generate`)."""
    model = _model()
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 256, (1, 13), generator=g)
    b = torch.randint(0, 256, (1, 5), generator=g)
    sa = model(a[:, :10], return_state=True).state
    sb = model(b[:, :3], return_state=True).state
    state = model.init_state(2)
    both = model(torch.cat([a[:, :10], torch.cat([b[:, :3], b.new_zeros(1, 7)], 1)]), state=state,
                 attention_mask=torch.tensor([[1] * 10, [1] * 3 + [0] * 7]), return_state=True).state
    dec = StaticDecoder(model, both)
    out_a, out_b = [], []
    for t in range(3):
        valid = torch.tensor([True, t < 2])
        logits = dec.step(torch.stack([a[0, 10 + t], b[0, 3 + min(t, 1)]]), valid)
        out_a.append(logits[0])
        if t < 2:
            out_b.append(logits[1])
    ref_a = model(a[:, 10:13], state=sa).logits[0]
    ref_b = model(b[:, 3:5], state=sb).logits[0]
    assert rel(torch.stack(out_a), ref_a) <= 1e-10
    assert rel(torch.stack(out_b), ref_b) <= 1e-10
    assert dec.positions.tolist() == [13, 5]


@torch.no_grad()
def test_float32_and_swiglu_tied():
    model = _model(torch.float32, swiglu=True, share_emb=True, scale_emb=True, rescale_nffn=True)
    ids = torch.randint(0, 256, (1, 19), generator=torch.Generator().manual_seed(5))
    full = model(ids).logits
    dec = StaticDecoder(model, model(ids[:, :4], return_state=True).state)
    steps = torch.stack([dec.step(ids[:, t]) for t in range(4, 19)], dim=1)
    assert rel(steps, full[:, 4:]) <= 1e-5


def test_errors():
    model = _model()
    with pytest.raises(TypeError, match="StreamState"):
        StaticDecoder(model, None)
    dec = StaticDecoder(model, model.init_state(2))
    with pytest.raises(ValueError, match="shape"):
        dec.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="eval mode"):
        StaticDecoder(_model().train(), model.init_state(1))


def test_generate_compile_path_equals_eager(monkeypatch):
    """generate(compile=True) routes decoding through StaticDecoder (the compiled step replaced by the eager one
    here; tests/models/test_compile.py compiles for real): same greedy and seeded tokens, with ragged
    prompts and EOS-finished rows, and a returned state that continues identically."""
    import megalodon_lm.generation.static_decode as sd
    from megalodon_lm import generate

    used = []
    monkeypatch.setattr(sd, "_compiled_step", lambda: used.append(1) or sd._decode_step)
    model = _model(torch.float32)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [1, 2, 3]]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=3), dict(temperature=1.0, seed=4,
                                                                                    eos_token_id=17)):
        a, sa = generate(model, prompts, max_new_tokens=12, return_state=True, **kw)
        b, sb = generate(model, prompts, max_new_tokens=12, return_state=True, compile=True, **kw)
        assert torch.equal(a, b), kw
        assert used, "generate(compile=True) did not use the static decoder"
        assert torch.equal(sa.positions, sb.positions)
        more_a = generate(model, a[:, -1:], state=sa, max_new_tokens=5, temperature=0.0)
        more_b = generate(model, b[:, -1:], state=sb, max_new_tokens=5, temperature=0.0)
        assert torch.equal(more_a, more_b)


@torch.no_grad()
def test_rows_join_and_leave_between_steps():
    """Continuous batching: a stream that joins a running decoder, and one taken out of it, go on exactly as
    if each ran alone (float64, chunk 8, streams at different offsets)."""
    model = _model()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 256, (1, 20), generator=g), torch.randint(0, 256, (1, 20), generator=g)
    full_a, full_b = model(a).logits, model(b).logits
    dec = StaticDecoder(model, model(a[:, :3], return_state=True).state)
    logits_a = [dec.step(a[:, t]) for t in range(3, 6)]
    dec.add_rows(model(b[:, :11], return_state=True).state)  # joins at offset 3 (chunk 8) while a is at 6
    assert dec.batch_size == 2
    for t in range(4):
        out = dec.step(torch.cat([a[:, 6 + t], b[:, 11 + t]]))
        logits_a.append(out[:1])
        assert rel(out[1:], full_b[:, 11 + t]) <= 1e-10
    taken = dec.remove_rows([0])  # a leaves after 10 tokens; b goes on alone
    assert dec.batch_size == 1 and taken.batch_size == 1 and int(taken.positions[0]) == 10
    assert rel(torch.cat(logits_a), full_a[0, 3:10]) <= 1e-10
    for t in range(15, 20):
        assert rel(dec.step(b[:, t]), full_b[:, t]) <= 1e-10
    resumed = model(a[:, 10:], state=taken).logits  # a's state from the decoder continues the model's stream
    assert rel(resumed, full_a[:, 10:]) <= 1e-10
    with pytest.raises(IndexError):
        dec.remove_rows([3])
