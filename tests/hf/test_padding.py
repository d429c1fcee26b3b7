"""Padded batches in transformers: every row computes exactly what it computes alone (pads touch no state)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megalodon_lm import generate  # noqa: E402

from .helpers import hf_model  # noqa: E402

PAD = 0
LENGTHS = (5, 12, 9)  # chunk_size 8: the longest prompt crosses a chunk boundary


def _prompts(lengths=LENGTHS, seed: int = 11) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (n,), generator=g) for n in lengths]


def _pad(prompts, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) padded on `side` with PAD."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = p, 1
    return ids, mask


@pytest.fixture(scope="module")
def model():
    return hf_model()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_forward_equals_rows_alone(model, side):
    prompts = _prompts()
    ids, mask = _pad(prompts, side)
    out = model(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    for i, p in enumerate(prompts):
        alone = model(p[None], output_hidden_states=True, use_cache=False)
        real = mask[i].bool()
        torch.testing.assert_close(out.logits[i, real], alone.logits[0], rtol=1e-5, atol=1e-5)
        assert bool((out.logits[i, ~real] == 0).all())
        assert len(out.hidden_states) == len(alone.hidden_states) == model.config.num_layers + 1
        for h, h1 in zip(out.hidden_states, alone.hidden_states, strict=True):
            torch.testing.assert_close(h[i, real], h1[0], rtol=1e-5, atol=1e-5)


def test_output_attentions_is_refused(model):
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        model(_prompts((4,))[0][None], output_attentions=True)


def test_pads_in_the_middle_are_skipped(model):
    p = _prompts((10,))[0]
    ids = torch.cat([p[:3], torch.full((4,), PAD), p[3:]])[None]
    mask = torch.ones_like(ids)
    mask[0, 3:7] = 0
    out = model(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out[0, mask[0].bool()], model(p[None], use_cache=False).logits[0], rtol=1e-5,
                               atol=1e-5)


def test_left_padded_stream_continues_each_row(model):
    """Prefill a left-padded batch into a cache, feed more tokens: the same as each row's own stream."""
    prompts = _prompts()
    ids, mask = _pad(prompts, "left")
    out = model(ids, attention_mask=mask, use_cache=True)
    cache = out.cache
    assert cache.get_seq_length() == ids.shape[1]  # columns fed, pads included (what generate slices by)
    assert cache.state.positions.tolist() == list(LENGTHS)
    more = torch.randint(1, 256, (3, 6), generator=torch.Generator().manual_seed(4))
    step = model(more, attention_mask=torch.cat([mask, torch.ones_like(more)], 1), past_key_values=cache)
    assert cache.get_seq_length() == ids.shape[1] + 6
    for i, p in enumerate(prompts):
        alone = model(torch.cat([p, more[i]])[None], use_cache=False).logits[0, len(p):]
        torch.testing.assert_close(step.logits[i], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_loss_counts_each_real_target_once(model, side):
    prompts = _prompts()
    ids, mask = _pad(prompts, side)
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
    total, count = 0.0, 0
    for p in prompts:
        logits = model(p[None], use_cache=False).logits[0]
        total += float(F.cross_entropy(logits[:-1], p[1:], reduction="sum").detach())
        count += len(p) - 1
    assert abs(float(loss.detach()) - total / count) < 1e-5


def test_left_padded_greedy_generate_equals_library_generate(model):
    prompts = _prompts()
    ids, mask = _pad(prompts, "left")
    ref = generate(model.model, prompts, max_new_tokens=10, temperature=0)
    for chunk in (None, 5):  # transformers' chunked prefill: 5 columns per forward
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                             eos_token_id=None, prefill_chunk_size=chunk)
        assert torch.equal(out[:, ids.shape[1]:], ref)


def test_left_padded_sampling_equals_library_sampling(model):
    """Same seed, same draws: transformers' and our sampling both call multinomial on (B, V) softmax probs."""
    prompts = _prompts()
    ids, mask = _pad(prompts, "left")
    torch.manual_seed(123)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=0, top_p=1.0,
                         temperature=1.0, pad_token_id=PAD, eos_token_id=None)
    torch.manual_seed(123)
    ref = generate(model.model, prompts, max_new_tokens=10, temperature=1.0)  # seed=None: torch's global RNG
    assert torch.equal(out[:, ids.shape[1]:], ref)


def test_left_padded_beam_search_equals_each_prompt_alone(model):
    prompts = _prompts()
    ids, mask = _pad(prompts, "left")
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    out = model.generate(ids, attention_mask=mask, **kwargs)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert torch.equal(out[i, ids.shape[1]:], alone[0, len(p):])
