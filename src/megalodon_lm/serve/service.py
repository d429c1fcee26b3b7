"""The serving core between HTTP and the engine: builds a turn's prompt, runs it, commits it.

A `Turn` is one completion request. For a session it starts from the last committed snapshot (the state,
its pending tokens, the tail the model wrote after its last reply, the generator), feeds only the new
messages' tokens and, once the reply is complete, commits the new snapshot and the messages in one
transaction. Until then nothing about the session changes, so an aborted turn leaves the previous one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import MegalodonLM
from .engine import BatchEngine, Request, TurnResult
from .loading import model_fingerprint
from .protocol import ApiError, Sampling, parse_messages, parse_prompt, parse_sampling, parse_session_id
from .sampling import RowSampler, generator_from_bytes, new_generator, rng_bytes
from .sessions import SessionManager
from .store import SessionSnapshot, SessionStore
from .template import ChatTemplate


@dataclass
class ServeSettings:
    """Server limits and options (the `megalodon-lm serve` flags)."""

    model_id: str = "megalodon"
    api_keys: tuple[str, ...] = ()
    max_batch: int = 16
    prefill_chunk: int = 512
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    max_cached_sessions: int = 64
    compile: bool = False


@dataclass
class Turn:
    """One request on its way through the engine."""

    service: Service
    kind: str  # "chat" or "text"
    sampling: Sampling
    prompt: list[int]
    request: Request | None = None
    session_id: str | None = None
    snapshot: SessionSnapshot | None = None
    messages: list[tuple[str, str]] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    done: bool = False
    _queue: asyncio.Queue | None = None

    def start(self, state, generator) -> None:
        """Hand the turn to the engine; events arrive on this event loop."""
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()

        def on_event(kind: str, payload: Any) -> None:  # engine thread -> this loop
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, (kind, payload))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        svc = self.service
        s = self.sampling
        sampler = RowSampler(s.temperature, s.top_k, s.top_p, s.repetition_penalty, generator, svc.vocab_size)
        stops = s.stop + (list(svc.template.stops) if self.kind == "chat" else [])
        self.request = Request(self.prompt, state, s.max_tokens, sampler, stops, None if s.ignore_eos else svc.eos_id,
                               on_event)
        try:
            svc.engine.submit(self.request)
        except RuntimeError as exc:
            raise ApiError(503, str(exc), "shutting_down", type="server_error") from exc

    async def events(self):
        """("text", delta) ... then ("done", TurnResult); raises ApiError(500) on an engine error."""
        while True:
            kind, payload = await self._queue.get()
            if kind == "error":
                raise ApiError(500, payload, "generation_failed", type="server_error")
            yield kind, payload
            if kind == "done":
                return

    def commit(self, result: TurnResult) -> None:
        """For a session: write the turn (state, pending, tail, generator, messages) in one transaction."""
        if self.session_id is not None:
            snap = SessionSnapshot(result.state, result.pending, result.tail,
                                   rng_bytes(self.request.sampler.generator), self.snapshot.turns + 1)
            if not self.service.sessions.commit(self.session_id, snap, [*self.messages, ("assistant", result.text)]):
                raise ApiError(409, f"session {self.session_id!r} was deleted or changed during this turn",
                               "session_conflict", "session_id")
        self.done = True

    def close(self) -> None:
        """Always called at the end: an unfinished turn is cancelled (nothing committed); the session is freed."""
        if not self.done and self.request is not None:
            self.request.cancel()
        if self.session_id is not None:
            self.service.sessions.release(self.session_id)
            self.session_id = None


class Service:
    """Model, tokenizer, template, engine and sessions of one server."""

    def __init__(self, model: MegalodonLM, tokenizer: Any, db_path: str | Path, settings: ServeSettings,
                 template: ChatTemplate | None = None) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.template = template or ChatTemplate()
        self.vocab_size = model.config.vocab_size
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.fingerprint = model_fingerprint(model, tokenizer)
        self.engine = BatchEngine(model, tokenizer, max_batch=settings.max_batch,
                                  prefill_chunk=settings.prefill_chunk, compile=settings.compile)
        self.store = SessionStore(db_path)
        self.sessions = SessionManager(self.store, self.fingerprint, settings.max_cached_sessions)
        self.max_state_bytes = self._max_state_bytes()

    def _max_state_bytes(self) -> int:
        """The bound of a session's state: a fresh state plus a full partial chunk (chunk_size - 1 tokens)."""
        cfg = self.model.config
        state = self.model.init_state(1, "cpu")
        per_token = sum((ls.attn_k.shape[2] * ls.attn_k.shape[3] + ls.attn_v.shape[2] * ls.attn_v.shape[3])
                        * ls.attn_k.element_size() for ls in state.layers)
        return state.nbytes() + (cfg.chunk_size - 1) * per_token

    def start(self) -> None:
        self.engine.start()

    def close(self) -> None:
        self.engine.stop()
        self.store.close()

    def check_model(self, body: dict[str, Any]) -> None:
        name = body.get("model")
        if name is not None and name != self.settings.model_id:
            raise ApiError(404, f"model {name!r} is not served here (this server serves {self.settings.model_id!r})",
                           "model_not_found", "model")

    def _sampling(self, body: dict[str, Any]) -> Sampling:
        s = self.settings
        return parse_sampling(body, s.default_max_tokens, s.max_tokens_limit)

    def completion_turn(self, body: dict[str, Any]) -> Turn:
        self.check_model(body)
        sampling = self._sampling(body)
        turn = Turn(self, "text", sampling, self.tokenizer.encode(parse_prompt(body)))
        if not turn.prompt:
            raise ApiError(400, "prompt encodes to no tokens", "invalid_value", "prompt")
        turn.start(None, new_generator(sampling.seed))
        return turn

    def chat_turn(self, body: dict[str, Any], owner: str) -> Turn:
        self.check_model(body)
        sampling = self._sampling(body)
        messages = parse_messages(body)
        session_id = parse_session_id(body)
        if session_id is None:
            prompt = self.tokenizer.encode(self.template.render(messages))
            turn = Turn(self, "chat", sampling, prompt, messages=messages)
            turn.start(None, new_generator(sampling.seed))
            return turn
        snap = self.sessions.acquire(session_id, owner)
        turn = Turn(self, "chat", sampling, [], session_id=session_id, snapshot=snap, messages=messages)
        try:
            text = self.template.render(messages) if snap.state is None else \
                self.template.continuation(messages, snap.tail)
            turn.prompt = snap.pending + self.tokenizer.encode(text)
            # A turn's seed re-seeds the session's generator; without one the stored generator goes on.
            generator = new_generator(sampling.seed) if sampling.seed is not None else generator_from_bytes(snap.rng)
            turn.start(snap.state, generator)
        except BaseException:
            turn.close()
            raise
        return turn
