"""Whole-model golden vectors from an independent float64 implementation of the reference semantics."""

from __future__ import annotations

import pytest
import torch

from megalodon_lm import MegalodonLM

from .helpers import BUFFER_SUFFIXES, GOLDEN_MODELS, load_golden, rel_err


@pytest.fixture(params=GOLDEN_MODELS)
def golden(request):
    return (request.param, *load_golden(request.param))


def _reference_freqs(cfg) -> torch.Tensor:
    """The reference's RoPE buffer: base^(-2j/dz) computed in float32."""
    dz = cfg.head_dim
    return 1.0 / (cfg.effective_rope_base ** (torch.arange(0, dz, 2).float() / dz))


def _is_buffer(name: str) -> bool:
    return name.endswith(BUFFER_SUFFIXES)


def test_golden_float64(golden):
    name, cfg, params, ids, expected = golden
    # Convert first, then load: loading float64 tensors into float32 parameters would round them.
    model = MegalodonLM(cfg).double().eval()
    result = model.load_state_dict(params, strict=False)
    assert list(result.missing_keys) == ["rope.freqs"], result
    assert list(result.unexpected_keys) == [], result
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.float64
    assert logits.shape == expected.shape
    assert rel_err(logits, expected) <= 1e-9, f"{name}: rel err {rel_err(logits, expected):.3e}"


def test_golden_float32(golden):
    name, cfg, params, ids, expected = golden
    model = MegalodonLM(cfg).eval()
    result = model.load_state_dict(params, strict=False)
    assert list(result.missing_keys) == ["rope.freqs"] and not result.unexpected_keys, result
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.float32
    assert rel_err(logits, expected) <= 1e-5, f"{name}: rel err {rel_err(logits, expected):.3e}"


def test_golden_with_loss_and_state(golden):
    """The same logits come back when targets are given and a state is requested."""
    name, cfg, params, ids, expected = golden
    model = MegalodonLM(cfg).double().eval()
    model.load_state_dict(params, strict=False)
    targets = ids.roll(-1, dims=1)
    with torch.no_grad():
        out = model(ids, targets=targets, return_state=True)
    assert rel_err(out.logits, expected) <= 1e-9
    ce = torch.nn.functional.cross_entropy(expected.reshape(-1, expected.shape[-1]), targets.reshape(-1))
    assert abs(float(out.loss) - float(ce)) <= 1e-9 * max(1.0, float(ce))
    assert out.state is not None and out.state.positions.tolist() == [ids.shape[1]] * ids.shape[0]


def test_parameter_inventory(golden):
    name, cfg, params, ids, expected = golden
    model = MegalodonLM(cfg)
    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
    ref = {n: tuple(t.shape) for n, t in params.items() if not _is_buffer(n)}
    assert set(ours) == set(ref), (
        f"{name}: only ours {sorted(set(ours) - set(ref))}, only reference {sorted(set(ref) - set(ours))}"
    )
    assert ours == ref
    buffers = {n: tuple(b.shape) for n, b in model.named_buffers()}
    ref_buffers = {n: tuple(t.shape) for n, t in params.items() if _is_buffer(n)}
    ref_buffers["rope.freqs"] = (cfg.head_dim // 2,)
    assert buffers == ref_buffers
    assert model.num_parameters() == cfg.num_parameters() == sum(t.numel() for n, t in params.items()
                                                                 if not _is_buffer(n))


def test_strict_load_of_reference_state_dict(golden):
    name, cfg, params, ids, expected = golden
    sd = dict(params)
    sd["rope.freqs"] = _reference_freqs(cfg)
    model = MegalodonLM(cfg).double().eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert rel_err(model(ids).logits, expected) <= 1e-9
    if cfg.share_emb:
        # A tied reference checkpoint may carry the shared matrix a second time.
        sd["output.output.weight"] = params["embed.weight"].clone()
        tied = MegalodonLM(cfg).double().eval()
        tied.load_state_dict(sd, strict=True)
        assert tied.output_weight is tied.embed.weight
        assert "output.output.weight" not in dict(tied.named_parameters())
        with torch.no_grad():
            assert rel_err(tied(ids).logits, expected) <= 1e-9


def test_strict_load_rejects_missing_or_extra_keys(golden):
    name, cfg, params, ids, expected = golden
    sd = dict(params)
    sd["rope.freqs"] = _reference_freqs(cfg)
    missing = {k: v for k, v in sd.items() if k != "layers.0.mega.wz.weight"}
    with pytest.raises(RuntimeError, match="layers.0.mega.wz.weight"):
        MegalodonLM(cfg).load_state_dict(missing, strict=True)
    extra = {**sd, "layers.0.mega.bogus": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="bogus"):
        MegalodonLM(cfg).load_state_dict(extra, strict=True)


def test_state_dict_round_trip_keeps_reference_names(golden):
    """Our own state_dict uses exactly the reference names (so it loads into the reference)."""
    name, cfg, params, ids, expected = golden
    model = MegalodonLM(cfg).double()
    model.load_state_dict(params, strict=False)
    sd = model.state_dict()
    assert set(sd) == set(params) | {"rope.freqs"}
    for k, v in params.items():
        assert torch.equal(sd[k].to(v.dtype), v), k
