"""`generate` / `stream_generate`: greedy exactness, ragged batches, EOS, sampling, streaming, continuation."""

from __future__ import annotations

import torch

from megalodon_lm.generation import generate, prefill, stream_generate
from megalodon_lm.generation.sampling import filter_logits, penalise

from .helpers import small_model as _model


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def test_greedy_matches_teacher_forced_argmax():
    model = _model()
    prompt = _ids(21, 1)[None]
    out = generate(model, prompt, max_new_tokens=12, temperature=0, prefill_chunk=5)
    assert out.shape == (1, 12) and out.dtype == torch.long
    with torch.no_grad():
        logits = model(torch.cat([prompt, out], 1)).logits[0]
    # Position t predicts token t+1: the argmax at the last prompt token and every generated one but the last.
    assert torch.equal(logits[20:-1].argmax(-1), out[0])


def test_prefill_chunk_does_not_change_tokens():
    model = _model()
    prompt = _ids(30, 2)[None]
    ref = generate(model, prompt, max_new_tokens=6, temperature=0)
    for chunk in (1, 3, 8, 29):
        assert torch.equal(generate(model, prompt, max_new_tokens=6, temperature=0, prefill_chunk=chunk), ref)


def test_ragged_batch_equals_each_prompt_alone():
    model = _model()
    rows = [_ids(1, 3).tolist(), _ids(13, 4), _ids(20, 5).tolist()]  # lists and tensors may be mixed
    batch = generate(model, rows, max_new_tokens=10, temperature=0, prefill_chunk=6)
    assert batch.shape == (3, 10)
    for i, row in enumerate(rows):
        alone = generate(model, [row], max_new_tokens=10, temperature=0, prefill_chunk=6)
        assert torch.equal(batch[i], alone[0]), f"row {i}"


def test_tensor_prompt_equals_list_prompt():
    model = _model()
    prompt = torch.stack([_ids(9, 6), _ids(9, 7)])
    assert torch.equal(generate(model, prompt, max_new_tokens=5, temperature=0),
                       generate(model, list(prompt), max_new_tokens=5, temperature=0))


def test_eos_stops_rows_and_fills_them():
    model = _model()
    rows = [_ids(5, 8), _ids(11, 9)]
    free = generate(model, rows, max_new_tokens=12, temperature=0)
    eos = int(free[0, 3])  # row 0 produces it at step 3 (or earlier)
    out, state = generate(model, rows, max_new_tokens=12, temperature=0, eos_token_id=eos, return_state=True)
    for i in range(2):
        hits = (free[i] == eos).nonzero()
        stop = int(hits[0]) if len(hits) else 11
        assert torch.equal(out[i, :stop + 1], free[i, :stop + 1])
        assert bool((out[i, stop:] == eos).all())
        # A stopped row's state stops too: everything before its EOS consumed, the EOS pending.
        assert int(state.positions[i]) == len(rows[i]) + stop
    # Without an EOS id nothing stops, even when that token comes up.
    assert torch.equal(generate(model, rows, max_new_tokens=12, temperature=0), free)


def test_stream_stops_once_every_row_is_done():
    model = _model()
    prompt = _ids(7, 10)[None]
    free = generate(model, prompt, max_new_tokens=8, temperature=0)
    eos = int(free[0, 2])
    stop = int((free[0] == eos).nonzero()[0])
    steps = list(stream_generate(model, prompt, max_new_tokens=8, temperature=0, eos_token_id=eos))
    assert len(steps) == stop + 1 and int(steps[-1][0]) == eos
    full = generate(model, prompt, max_new_tokens=8, temperature=0, eos_token_id=eos)
    assert full.shape == (1, 8) and bool((full[0, stop:] == eos).all())


def test_sampling_is_deterministic_per_seed():
    model = _model()
    prompt = torch.stack([_ids(6, 11), _ids(6, 12)])
    a = generate(model, prompt, max_new_tokens=16, temperature=1.0, seed=123)
    b = generate(model, prompt, max_new_tokens=16, temperature=1.0, seed=123)
    c = generate(model, prompt, max_new_tokens=16, temperature=1.0, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)  # seed=None: torch's global generator
    d = generate(model, prompt, max_new_tokens=16, temperature=1.0)
    torch.manual_seed(5)
    assert torch.equal(d, generate(model, prompt, max_new_tokens=16, temperature=1.0))


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = _model()
    prompt = _ids(10, 13)[None]
    greedy = generate(model, prompt, max_new_tokens=10, temperature=0)
    assert torch.equal(generate(model, prompt, max_new_tokens=10, temperature=1.5, top_k=1, seed=1), greedy)
    assert torch.equal(generate(model, prompt, max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=2), greedy)


def test_nucleus_and_top_k_filters():
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log()  # probabilities 0.5, 0.3, 0.2, 0
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert kept(top_k=None, top_p=0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(top_k=None, top_p=0.7) == [True, True, False, False]
    assert kept(top_k=None, top_p=0.81) == [True, True, True, False]
    assert kept(top_k=2, top_p=None) == [True, True, False, False]
    assert kept(top_k=None, top_p=1.0) == [True, True, True, False]  # the zero-probability token is -inf already


def test_ctrl_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalise(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_penalty_breaks_a_greedy_repetition():
    model = _model()
    prompt = _ids(8, 14)[None]
    greedy = generate(model, prompt, max_new_tokens=24, temperature=0)
    history = set(prompt[0].tolist())
    repeats = [t in history or t in greedy[0, :i].tolist() for i, t in enumerate(greedy[0].tolist())]
    assert any(repeats), "precondition: greedy decoding repeats a token here"
    assert torch.equal(generate(model, prompt, max_new_tokens=24, temperature=0, repetition_penalty=1.0), greedy)
    penalised = generate(model, prompt, max_new_tokens=24, temperature=0, repetition_penalty=3.0)
    assert not torch.equal(penalised, greedy)
    seen = set(prompt[0].tolist())
    n_repeats = 0
    for t in penalised[0].tolist():
        n_repeats += t in seen
        seen.add(t)
    assert n_repeats < sum(repeats)


def test_stream_generate_yields_what_generate_returns():
    model = _model()
    rows = [_ids(4, 15), _ids(9, 16)]
    kwargs = dict(max_new_tokens=9, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3, seed=7)
    steps = list(stream_generate(model, rows, **kwargs))
    assert len(steps) == 9 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), generate(model, rows, **kwargs))


def test_continue_from_returned_state_equals_one_call():
    model = _model()
    rows = [_ids(3, 17), _ids(12, 18)]
    one = generate(model, rows, max_new_tokens=14, temperature=0)
    first, state = generate(model, rows, max_new_tokens=6, temperature=0, return_state=True)
    assert state.positions.tolist() == [3 + 5, 12 + 5]  # lag by one: the last generated token is pending
    rest = generate(model, first[:, -1:], state=state, max_new_tokens=8, temperature=0)
    assert torch.equal(torch.cat([first, rest], 1), one)
    # Sampling continues exactly when the same generators (one per row; seed=3 seeds each row with 3) are
    # passed on.
    one = generate(model, rows, max_new_tokens=14, temperature=1.0, seed=3)
    rngs = [torch.Generator().manual_seed(3) for _ in rows]
    first, state = generate(model, rows, max_new_tokens=6, temperature=1.0, seed=rngs, return_state=True)
    rest = generate(model, first[:, -1:], state=state, max_new_tokens=8, temperature=1.0, seed=rngs)
    assert torch.equal(torch.cat([first, rest], 1), one)


def test_zero_new_tokens_and_prefill_leave_the_last_prompt_token_pending():
    model = _model()
    rows = [_ids(5, 19), _ids(10, 20)]
    out, state = generate(model, rows, max_new_tokens=0, return_state=True)
    assert out.shape == (2, 0) and state.positions.tolist() == [4, 9]
    assert generate(model, rows, max_new_tokens=0).shape == (2, 0)
    pending = torch.stack([rows[0][-1], rows[1][-1]])[:, None]
    ref = generate(model, rows, max_new_tokens=5, temperature=0)
    assert torch.equal(generate(model, pending, state=state, max_new_tokens=5, temperature=0), ref)
    state2, pending2 = prefill(model, rows, prefill_chunk=3)
    assert torch.equal(pending2[:, None], pending)
    assert torch.equal(generate(model, pending2[:, None], state=state2, max_new_tokens=5, temperature=0), ref)


def test_modes_are_restored():
    model = _model()
    model.train()
    try:
        stream = stream_generate(model, _ids(4, 21)[None], max_new_tokens=3, temperature=0)
        next(stream)
        assert torch.is_grad_enabled()  # the caller's code between yields runs with its own grad mode
        list(stream)
        assert model.training
        generate(model, _ids(4, 21)[None], max_new_tokens=2, temperature=0)
        assert model.training and torch.is_grad_enabled()
    finally:
        model.eval()


def test_output_layer_wider_than_vocabulary():
    model = _model(output_size=300)
    out = generate(model, _ids(5, 22)[None], max_new_tokens=20, temperature=2.0, seed=0)
    assert int(out.max()) < 256
