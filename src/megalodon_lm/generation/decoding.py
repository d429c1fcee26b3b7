"""Constant-memory text generation: chunked prefill, then one token per step through the streaming state.

The state contract ("lag by one"): a generation state has consumed every token of the stream except the
last one, the *pending* token, which is fed at the start of the next step. `prefill` feeds each prompt
row minus its last token; every decode step feeds the pending token, samples the next one and makes it
pending. Hence the state returned with `return_state=True` has consumed prompt + tokens[:, :-1], and

    tokens, state = generate(model, prompt, max_new_tokens=n, return_state=True)
    more = generate(model, tokens[:, -1:], state=state, max_new_tokens=m)

gives exactly the tokens that one call with `max_new_tokens=n + m` gives (greedy; for sampling pass the
same `torch.Generator`, or with several rows the same list of one generator per row, as `seed` to both
calls). A row that stopped at EOS is continued after its EOS. A continuation prompt may be longer than one
token: it is `tokens[:, -1:]` followed by new text. The repetition penalty only sees the tokens of one call
(its prompt and output), so with a penalty a continuation can differ from one long call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..models import MegalodonLM, StreamState
from .sampling import RowSeeds, row_generators, sample_rows
from .static_decode import StaticDecoder

PromptIds = torch.Tensor | Sequence[Sequence[int] | torch.Tensor]


# ---------------------------------------------------------------------- checks
def _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, prefill_chunk) -> None:
    """One clear error per bad sampling option."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    if not temperature >= 0 or math.isinf(temperature):  # `not >=` also catches NaN
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise TypeError(f"top_k must be an int or None, got {top_k!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no top-k filter), got {top_k}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] (or None for no nucleus filter), got {top_p!r}")
    if repetition_penalty is not None and not (
        isinstance(repetition_penalty, (int, float)) and repetition_penalty > 0 and math.isfinite(repetition_penalty)
    ):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = none), got {repetition_penalty!r}")
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive int, got {prefill_chunk!r}")


def _as_row(row, index: int) -> torch.Tensor:
    """One prompt of a list as a 1-D int64 CPU tensor."""
    if isinstance(row, (int, float)) or (isinstance(row, torch.Tensor) and row.dim() == 0):
        raise TypeError("prompt_ids as a list must hold one 1-D sequence of token ids per row; "
                        "for a single prompt wrap it: [ids]")
    if isinstance(row, torch.Tensor):
        t = row
    elif isinstance(row, (str, bytes)):
        raise TypeError(f"prompt_ids row {index} is text: encode it with the tokenizer first")
    else:
        try:  # an empty list would infer float32: it is an empty row of ids
            t = torch.as_tensor(row) if len(row) else torch.zeros(0, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"prompt_ids row {index} is not a sequence of token ids: {exc}") from exc
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"prompt_ids row {index} must hold integer token ids, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"prompt_ids row {index} must be 1-D, got shape {tuple(t.shape)}")
    return t.to("cpu", torch.long)


def _tensor_batch(prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if prompt_ids.is_floating_point() or prompt_ids.is_complex() or prompt_ids.dtype == torch.bool:
        raise TypeError(f"prompt_ids must hold integer token ids (e.g. torch.long), got dtype {prompt_ids.dtype}")
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be 2-D (batch, length), got shape {tuple(prompt_ids.shape)}; "
                         "for one prompt use ids[None]")
    B, L = prompt_ids.shape
    if B == 0:
        raise ValueError("prompt_ids has no rows (batch size 0)")
    return prompt_ids.to("cpu", torch.long), torch.full((B,), L, dtype=torch.long)


def _list_batch(prompt_ids: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompt_ids:
        raise ValueError("prompt_ids is an empty list: need at least one prompt")
    rows = [_as_row(r, i) for i, r in enumerate(prompt_ids)]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)  # right padding with id 0 (masked)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, lengths


def as_prompt_batch(prompt_ids: PromptIds, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate prompts -> (ids (B, L) int64 right-padded with 0, lengths (B,) int64), both on the CPU."""
    if isinstance(prompt_ids, torch.Tensor):
        ids, lengths = _tensor_batch(prompt_ids)
    elif isinstance(prompt_ids, (list, tuple)):
        ids, lengths = _list_batch(prompt_ids)
    else:
        raise TypeError(f"prompt_ids must be a (B, L) integer tensor or a list of 1-D sequences, "
                        f"got {type(prompt_ids).__name__}")
    if bool((lengths == 0).any()):
        bad = int((lengths == 0).nonzero()[0])
        raise ValueError(f"prompt row {bad} is empty: every row needs at least one token (to continue a "
                         "saved state, pass the last generated token: tokens[:, -1:])")
    real = ids if bool((lengths == ids.shape[1]).all()) else ids[torch.arange(ids.shape[1]) < lengths[:, None]]
    lo, hi = int(real.min()), int(real.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {vocab_size}) (the model's vocab_size); "
                         f"got values in [{lo}, {hi}]")
    return ids, lengths


# ---------------------------------------------------------------------- model calls
@contextmanager
def _eval_mode(model: MegalodonLM):
    """Eval mode for the duration of a generation (dropout off), the previous mode restored afterwards."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _step(model: MegalodonLM, ids: torch.Tensor, mask: torch.Tensor | None, state: StreamState):
    # no_grad per call, not around a whole generator: grad mode is thread-global and the caller's code
    # runs between our yields.
    with torch.no_grad():
        return model(ids, state=state, attention_mask=mask, return_state=True, last_logits_only=True)


def prefill(
    model: MegalodonLM, prompt_ids: PromptIds, *, state: StreamState | None = None, prefill_chunk: int = 4096
) -> tuple[StreamState, torch.Tensor]:
    """Feed every prompt row but its last token, `prefill_chunk` columns per forward.

    Returns (state, pending (B,) int64): the pending tokens (each row's last prompt token) are what the
    next decode step feeds. Time O(L), memory bounded by the chunk: only (B, 1, V) logits are projected.
    """
    _check_options(0, 1.0, None, None, None, prefill_chunk)
    ids, lengths = as_prompt_batch(prompt_ids, model.config.vocab_size)
    with _eval_mode(model):
        return _prefill(model, ids, lengths, state, prefill_chunk)


def _prefill(model, ids, lengths, state, chunk) -> tuple[StreamState, torch.Tensor]:
    device = model.embed.weight.device
    B = ids.shape[0]
    if state is None:
        state = model.init_state(B, device)
    elif not isinstance(state, StreamState):
        raise TypeError(f"state must be a StreamState, got {type(state).__name__}")
    elif state.batch_size != B:
        raise ValueError(f"state is for batch size {state.batch_size}, but there are {B} prompts")
    else:
        state = state.to(device)
    ctx = lengths - 1  # tokens each row feeds here; the last one stays pending
    for start in range(0, int(ctx.max()), chunk):
        seg_len = (ctx - start).clamp(0, chunk)
        width = int(seg_len.max())
        real = torch.arange(width) < seg_len[:, None]
        mask = None if bool(real.all()) else real.to(device)
        state = _step(model, ids[:, start:start + width].to(device), mask, state).state
    pending = ids[torch.arange(B), lengths - 1].to(device)
    return state, pending


# ---------------------------------------------------------------------- sampling
def _sample(logits, seen, temperature, top_k, top_p, penalty, rng) -> torch.Tensor:
    """(B, V) CPU logits -> (B,) int64 next tokens; `rng`: one generator per row, or one for all rows
    (generation.sampling.sample_rows)."""
    return sample_rows(logits, rng, temperature, top_k, top_p, penalty, seen)


# ---------------------------------------------------------------------- public entry points
@dataclass
class _Job:
    """A checked generation request."""

    ids: torch.Tensor  # (B, L) int64 CPU, right-padded
    lengths: torch.Tensor  # (B,) int64 CPU
    state: StreamState | None
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    penalty: float | None
    eos: int | None
    rng: list[torch.Generator | None]  # one per row (generation.sampling.row_generators)
    prefill_chunk: int
    compile: bool = False


def _prepare(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_token_id, seed,
             state, prefill_chunk, compile=False) -> _Job:
    if not isinstance(model, MegalodonLM):
        raise TypeError(f"model must be a MegalodonLM, got {type(model).__name__}")
    _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, prefill_chunk)
    vocab = model.config.vocab_size
    ids, lengths = as_prompt_batch(prompt_ids, vocab)
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                     or not 0 <= eos_token_id < vocab):
        raise ValueError(f"eos_token_id must be None or an int in [0, {vocab}), got {eos_token_id!r}")
    if state is not None and not isinstance(state, StreamState):
        raise TypeError(f"state must be a StreamState (from generate(..., return_state=True)), got "
                        f"{type(state).__name__}")
    if state is not None and state.batch_size != ids.shape[0]:
        raise ValueError(f"state is for batch size {state.batch_size}, but there are {ids.shape[0]} prompts")
    return _Job(ids, lengths, state, max_new_tokens, float(temperature), top_k, top_p, repetition_penalty,
                eos_token_id, row_generators(seed, ids.shape[0]), prefill_chunk, bool(compile))


def _decode(model: MegalodonLM, job: _Job) -> Iterator[tuple[torch.Tensor, Callable[[], StreamState]]]:
    """Prefill, then yield (tokens (B,) on the model's device, a function giving the state now) per step, in
    eval mode throughout. The state is built only when asked for (the compiled decoder converts it)."""
    if job.max_new_tokens == 0:
        return
    with _eval_mode(model):
        yield from _decode_steps(model, job)


def _decode_steps(model: MegalodonLM, job: _Job) -> Iterator[tuple[torch.Tensor, Callable[[], StreamState]]]:
    ids, lengths = job.ids, job.lengths
    B, vocab = ids.shape[0], model.config.vocab_size
    state, pending = _prefill(model, ids, lengths, job.state, job.prefill_chunk)
    seen = None
    if job.penalty is not None:  # history = the prompt given to this call, plus what it generates
        seen = torch.zeros(B, vocab, dtype=torch.bool)
        real = torch.arange(ids.shape[1]) < lengths[:, None]
        seen[torch.arange(B)[:, None].expand_as(ids)[real], ids[real]] = True
    done = torch.zeros(B, dtype=torch.bool)
    # compile=True: fixed-shape state and one compiled graph for every step (generation/static_decode.py).
    decoder = StaticDecoder(model, state, compile=True) if job.compile else None
    for _ in range(job.max_new_tokens):
        # Finished rows are fully padded: their state stays where their EOS became pending.
        if decoder is None:
            mask = (~done)[:, None].to(pending.device) if bool(done.any()) else None
            out = _step(model, pending[:, None], mask, state)
            state, raw = out.state, out.logits[:, -1]
            state_fn = lambda state=state: state  # noqa: E731 - binds this step's state
        else:
            raw, state_fn = decoder.step(pending, (~done).to(pending.device)), decoder.stream_state
        # Sample on the CPU: one code path and one RNG stream whatever the model's device. An output layer
        # wider than the vocabulary (output_size) must not produce ids the embedding cannot take.
        logits = raw[:, :vocab].cpu().masked_fill(done[:, None], 0.0)
        nxt = _sample(logits, seen, job.temperature, job.top_k, job.top_p, job.penalty, job.rng)
        if job.eos is not None:
            nxt = nxt.masked_fill(done, job.eos)
            done |= nxt == job.eos
        if seen is not None:
            seen[torch.arange(B), nxt] = True
        pending = nxt.to(pending.device)
        yield pending, state_fn
        if bool(done.all()):
            return


def stream_generate(
    model: MegalodonLM,
    prompt_ids: PromptIds,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | None = None,
    seed: RowSeeds = None,
    state: StreamState | None = None,
    prefill_chunk: int = 4096,
    return_state: bool = False,
    compile: bool = False,
) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, StreamState]]:
    """Like `generate`, but yields each step's tokens (B,) int64 as they are produced; with return_state,
    (tokens, state) where the state has consumed everything before these tokens (they are pending).

    Stops after `max_new_tokens` steps, or earlier once every row has produced `eos_token_id` (rows that
    stopped before yield EOS). Arguments are checked at the call, before the first token. `compile` as in
    `generate`.
    """
    job = _prepare(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_token_id,
                   seed, state, prefill_chunk, compile)
    steps = _decode(model, job)
    # A state is read when its step is yielded, before the next step runs.
    return ((tokens, state_fn()) for tokens, state_fn in steps) if return_state else (t for t, _ in steps)


def generate(
    model: MegalodonLM,
    prompt_ids: PromptIds,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | None = None,
    seed: RowSeeds = None,
    state: StreamState | None = None,
    prefill_chunk: int = 4096,
    return_state: bool = False,
    compile: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, StreamState]:
    """Generate `max_new_tokens` tokens after each prompt row -> (B, max_new_tokens) int64, prompt excluded.

    prompt_ids: (B, L) integer tensor, or a list of B 1-D sequences of different lengths. temperature 0 =
    greedy argmax; otherwise the logits go through repetition_penalty (CTRL, over this call's prompt +
    generated tokens), / temperature, top_k, top_p, then a multinomial draw. Each row draws from its own
    stream (generation.sampling): `seed` an int gives every row a fresh generator seeded with it, so each row
    gives what it gives alone with that seed, greedy or sampled (up to float rounding of batched logits);
    a list of B ints / CPU torch.Generators gives row b the b-th (pass it again to continue); a single
    torch.Generator is shared by the rows in turn (B = 1: continues that stream exactly); None uses torch's
    global RNG. Rows that produce `eos_token_id` are filled with it afterwards;
    without one, generation never stops early. `state` continues a stream (see the module docstring:
    pass the previous call's tokens[:, -1:] first); with return_state=True returns (tokens, state).
    compile=True decodes with a `torch.compile`d fixed-shape step (generation/static_decode.py): the same
    tokens up to float rounding; for `tiny` on 2 CPU cores 4.0 instead of 12.5 ms per token at a 1K context
    (docs/performance.md), after a one-off compile of about a minute.
    The result is on the model's device.
    """
    job = _prepare(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_token_id,
                   seed, state, prefill_chunk, compile)
    device = model.embed.weight.device
    tokens = torch.empty(job.ids.shape[0], max_new_tokens, dtype=torch.long, device=device)
    last_state_fn, n = None, 0
    for step_tokens, state_fn in _decode(model, job):
        tokens[:, n] = step_tokens
        last_state_fn, n = state_fn, n + 1
    if n < max_new_tokens:  # only when every row stopped at EOS
        tokens[:, n:] = job.eos
    if not return_state:
        return tokens
    if last_state_fn is None:  # max_new_tokens == 0: the prefilled state, each row's last prompt token pending
        with _eval_mode(model):
            return tokens, _prefill(model, job.ids, job.lengths, job.state, job.prefill_chunk)[0]
    return tokens, last_state_fn()
