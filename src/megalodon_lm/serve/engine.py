"""Continuous batching: every active request advances by one token per batched model step.

One engine thread owns the model. Each loop iteration
  1. admits queued requests (up to `max_batch` active in all) and drops cancelled ones,
  2. prefills one piece of every joining request's prompt (at most `prefill_chunk` tokens per iteration in
     all, padded rows masked), so a long prompt is fed over many iterations while the others keep decoding,
  3. runs one `StaticDecoder` step over all decoding rows and samples each row with its own sampler.
Requests join the decoding batch when their prompt is in and leave it when they finish; rows are
independent in every operation, so a request gives the same tokens alone or with others (float rounding
of batched matrix products aside). Each request's stream follows the "lag by one" contract of
`megalodon_lm.generation.decoding`: its final state has consumed everything but the last token (pending).
Events go to each request's `on_event` callback, called on the engine thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generation.static_decode import StaticDecoder
from ..models import MegalodonLM, StreamState
from ..runtime import release_free_memory
from .sampling import RowSampler
from .text import StopTracker


@dataclass
class TurnResult:
    """A finished request. state (B=1, CPU) has consumed the prompt and every generated token but `pending`."""

    state: StreamState
    pending: list[int]  # [] when the last token was EOS (it is not fed to the stream)
    text: str  # the reply, without a stop string
    tail: str  # what the model wrote from the stop string on ("" without one)
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Request:
    """prompt: the tokens to feed (>= 1; the last one is fed by the first decode step). state: B=1 state
    to continue (None = a fresh stream). on_event(kind, payload): ("text", str) per token with the newly
    released text, then ("done", TurnResult) or ("error", message)."""

    prompt: list[int]
    state: StreamState | None
    max_tokens: int
    sampler: RowSampler
    stops: list[str]
    eos_id: int | None
    on_event: Callable[[str, Any], None]
    cancelled: bool = False
    # engine-side progress
    fed: int = 0
    tracker: StopTracker | None = None
    generated: list[int] = field(default_factory=list)

    def cancel(self) -> None:
        """Stop this request at the next step boundary; it produces no result (any thread)."""
        self.cancelled = True


class BatchEngine:
    """The model's only user. `submit` from any thread; `start`/`stop` the loop thread."""

    def __init__(self, model: MegalodonLM, tokenizer: Any, *, max_batch: int = 16, prefill_chunk: int = 512,
                 compile: bool = False) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch}, {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_chunk, self.compile = max_batch, prefill_chunk, compile
        self.device = model.embed.weight.device
        self.vocab = model.config.vocab_size
        self._cond = threading.Condition()
        self._queue: deque[Request] = deque()
        self._prefilling: list[Request] = []
        self._decoding: list[Request] = []  # in the decoder's row order
        self._pending = torch.zeros(0, dtype=torch.long)
        self._decoder: StaticDecoder | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # batched decode steps run (for tests and /health)
        self.prefill_pieces = 0
        self.seconds = {"prefill": 0.0, "decode": 0.0}  # time in each phase (for /health and benchmarks)
        self._trimmed = 0.0

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="megalodon-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort every request still running or queued (they get an error event) and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        if not request.prompt:
            raise ValueError("a request needs at least one prompt token")
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._queue.append(request)
            self._cond.notify_all()

    def load(self) -> dict[str, int]:
        """Queued, prefilling and decoding request counts."""
        return {"queued": len(self._queue), "prefilling": len(self._prefilling), "decoding": len(self._decoding)}

    def counters(self) -> dict[str, float]:
        """Batched decode steps, prefill pieces and seconds spent in each so far."""
        return {"decode_steps": self.steps, "prefill_pieces": self.prefill_pieces,
                "decode_seconds": round(self.seconds["decode"], 3),
                "prefill_seconds": round(self.seconds["prefill"], 3)}

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._queue or self._prefilling or self._decoding):
                    self._cond.wait()
                if self._stopping:
                    break
                while self._queue and len(self._prefilling) + len(self._decoding) < self.max_batch:
                    self._prefilling.append(self._queue.popleft())
            try:
                self._drop_cancelled()
                t0 = time.perf_counter()
                if self._prefilling:
                    self._prefill_piece()
                t1 = time.perf_counter()
                if self._decoding:
                    self._decode_step()
                self.seconds["prefill"] += t1 - t0
                self.seconds["decode"] += time.perf_counter() - t1
            except Exception as exc:  # a bug or out-of-memory: fail the running requests, keep serving
                self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")
        self._fail_all("the server is shutting down")
        with self._cond:
            for r in self._queue:
                r.on_event("error", "the server is shutting down")
            self._queue.clear()

    def _fail_all(self, message: str) -> None:
        for r in self._prefilling + self._decoding:
            r.on_event("error", message)
        self._prefilling, self._decoding, self._decoder = [], [], None
        self._pending = torch.zeros(0, dtype=torch.long)

    def _drop_cancelled(self) -> None:
        self._prefilling = [r for r in self._prefilling if not r.cancelled]
        gone = [i for i, r in enumerate(self._decoding) if r.cancelled]
        if gone:
            self._leave(gone)

    # ------------------------------------------------------------------ prefill
    def _prefill_piece(self) -> None:
        """One piece of each joining prompt (all but its last token), in one masked forward."""
        rows = self._prefilling
        width = max(1, self.prefill_chunk // len(rows))
        todo = [min(width, len(r.prompt) - 1 - r.fed) for r in rows]
        feeding = [(r, n) for r, n in zip(rows, todo, strict=True) if n > 0]
        if feeding:
            w = max(n for _, n in feeding)
            ids = torch.zeros(len(feeding), w, dtype=torch.long)
            for i, (r, n) in enumerate(feeding):
                ids[i, :n] = torch.as_tensor(r.prompt[r.fed:r.fed + n])
            lengths = torch.tensor([n for _, n in feeding])
            mask = None if bool((lengths == w).all()) else (torch.arange(w) < lengths[:, None]).to(self.device)
            state = StreamState.stack([self._fresh(r) for r, _ in feeding]).to(self.device)
            with torch.no_grad():
                out = self.model(ids.to(self.device), state=state, attention_mask=mask, return_state=True,
                                 last_logits_only=True)
            for i, (r, n) in enumerate(feeding):
                r.state = out.state.select([i], chunk_size=self.model.config.chunk_size)
                r.fed += n
            self.prefill_pieces += 1
        ready = [r for r in rows if r.fed == len(r.prompt) - 1]
        if ready:
            self._prefilling = [r for r in rows if r.fed < len(r.prompt) - 1]
            self._join(ready)

    def _fresh(self, r: Request) -> StreamState:
        if r.state is None:
            r.state = self.model.init_state(1, self.device)
        return r.state

    # ------------------------------------------------------------------ decode
    def _join(self, requests: list[Request]) -> None:
        state = StreamState.stack([self._fresh(r) for r in requests]).to(self.device)
        if self._decoder is None:
            self._decoder = StaticDecoder(self.model, state, compile=self.compile)
        else:
            self._decoder.add_rows(state)
        for r in requests:
            r.state = None  # the decoder holds it now
            r.tracker = StopTracker(self.tokenizer, r.stops)
            r.sampler.observe(r.prompt)
        self._decoding += requests
        self._pending = torch.cat([self._pending, torch.tensor([r.prompt[-1] for r in requests])])

    def _leave(self, rows: list[int]) -> list[StreamState]:
        """Take rows out of the decoding batch -> their states (B=1 each, CPU)."""
        state = self._decoder.remove_rows(rows).to("cpu")
        keep = [i for i in range(len(self._decoding)) if i not in set(rows)]
        self._decoding = [self._decoding[i] for i in keep]
        self._pending = self._pending[keep]
        if not self._decoding:
            self._decoder = None  # the next request builds a fresh decoder
        if not self._decoding or time.monotonic() - self._trimmed > 1.0:
            # Rows leaving free whole batches of state; hand the memory back (when idle, else at most once a
            # second: a few ms) so that a server's footprint follows its load instead of its history.
            release_free_memory()
            self._trimmed = time.monotonic()
        return [state.select([i]) for i in range(len(rows))]

    def _decode_step(self) -> None:
        # Sampling on the CPU, one row at a time with the row's own generator (float64 models keep float64).
        logits = self._decoder.step(self._pending.to(self.device))[:, :self.vocab].cpu()
        self.steps += 1
        finished: list[tuple[int, str, bool]] = []
        for i, r in enumerate(self._decoding):
            token = r.sampler.sample(logits[i])
            self._pending[i] = token
            r.generated.append(token)
            if r.eos_id is not None and token == r.eos_id:
                finished.append((i, "stop", True))
                r.on_event("text", r.tracker.finish())
                continue
            delta = r.tracker.add(token)
            if r.tracker.stopped:
                finished.append((i, "stop", False))
            elif len(r.generated) >= r.max_tokens:
                delta += r.tracker.finish()
                finished.append((i, "length", False))
            r.on_event("text", delta)
        if finished:
            rows = [i for i, _, _ in finished]
            reqs = [self._decoding[i] for i in rows]
            for r, state, (_, reason, eos) in zip(reqs, self._leave(rows), finished, strict=True):
                t = r.tracker
                r.on_event("done", TurnResult(state, [] if eos else [r.generated[-1]], t.reply, t.tail, reason,
                                              len(r.prompt), len(r.generated)))
