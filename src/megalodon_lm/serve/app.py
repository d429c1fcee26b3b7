"""HTTP routes (Starlette): the OpenAI-compatible API, the sessions extension and the chat page.

GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream` as
server-sent events ending in `data: [DONE]`), POST/GET /v1/sessions, GET/DELETE /v1/sessions/{id},
GET /v1/sessions/{id}/messages, and GET / (the chat page). Errors are JSON in OpenAI's shape.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import time
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import TurnResult
from .protocol import ApiError, parse_json_body
from .service import Service, Turn
from .sessions import owner_of
from .store import SessionInfo


def _error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _read_json(request: Request, limit: int, allow_empty: bool = False) -> dict[str, Any]:
    """The body as a JSON object, refused (413) past `limit` bytes without reading further."""
    too_big = ApiError(413, f"the request body exceeds this server's limit of {limit} bytes", "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    return {} if allow_empty and not raw.strip() else parse_json_body(raw)


def _page() -> str:
    """The chat page: index.html with its stylesheet and script inlined (one self-contained response)."""
    root = resources.files(__package__) / "page"
    html = (root / "index.html").read_text(encoding="utf-8")
    return (html.replace("/*STYLE*/", (root / "style.css").read_text(encoding="utf-8"))
                .replace("/*SCRIPT*/", (root / "app.js").read_text(encoding="utf-8")))


class _TurnResponse(StreamingResponse):
    """Server-sent events of one turn; the turn is closed however the response ends (a client that
    disconnects mid-stream cancels the generation and nothing is committed)."""

    def __init__(self, turn: Turn, events) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.turn = turn

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.turn.close()


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _usage(result: TurnResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


class Api:
    """Route handlers bound to one `Service`."""

    def __init__(self, service: Service) -> None:
        self.svc = service
        self.settings = service.settings
        self._page = _page()

    # ------------------------------------------------------------------ helpers
    def owner(self, request: Request) -> str:
        keys = self.settings.api_keys
        if not keys:
            return owner_of(None)
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        for key in keys:
            if given and hmac.compare_digest(given.encode(), key.encode()):
                return owner_of(key)
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'" if given or auth else
                       "this server needs an API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    def session_json(self, info: SessionInfo) -> dict[str, Any]:
        return {"id": info.id, "object": "session", "tokens": info.tokens, "state_bytes": info.state_bytes,
                "max_state_bytes": self.svc.max_state_bytes, "turns": info.turns, "messages": info.messages,
                "created": int(info.created), "updated": int(info.updated), "model": self.settings.model_id}

    # ------------------------------------------------------------------ plain routes
    async def page(self, request: Request) -> Response:
        return HTMLResponse(self._page)

    async def health(self, request: Request) -> Response:
        engine = self.svc.engine
        return JSONResponse({"status": "ok", "model": self.settings.model_id, **engine.load(), **engine.counters()})

    async def models(self, request: Request) -> Response:
        self.owner(request)
        return JSONResponse({"object": "list", "data": [{"id": self.settings.model_id, "object": "model",
                                                         "created": 0, "owned_by": "megalodon-lm"}]})

    async def create_session(self, request: Request) -> Response:
        owner = self.owner(request)
        body = await _read_json(request, self.settings.max_body_bytes, allow_empty=True)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
            raise ApiError(400, f"seed must be a non-negative integer below 2**63, got {seed!r}", "invalid_value",
                           "seed")
        return JSONResponse(self.session_json(self.svc.sessions.create(owner, seed)), status_code=201)

    async def list_sessions(self, request: Request) -> Response:
        owner = self.owner(request)
        return JSONResponse({"object": "list",
                             "data": [self.session_json(i) for i in self.svc.store.list(owner)]})

    async def get_session(self, request: Request) -> Response:
        owner = self.owner(request)
        return JSONResponse(self.session_json(self.svc.sessions.info(request.path_params["sid"], owner)))

    async def session_messages(self, request: Request) -> Response:
        owner = self.owner(request)
        sid = request.path_params["sid"]
        self.svc.sessions.info(sid, owner)
        return JSONResponse({"object": "list", "data": self.svc.store.messages(sid)})

    async def delete_session(self, request: Request) -> Response:
        owner = self.owner(request)
        sid = request.path_params["sid"]
        self.svc.sessions.delete(sid, owner)
        return JSONResponse({"id": sid, "object": "session.deleted", "deleted": True})

    # ------------------------------------------------------------------ completions
    async def completions(self, request: Request) -> Response:
        self.owner(request)
        body = await _read_json(request, self.settings.max_body_bytes)
        return await self._respond(self.svc.completion_turn(body))

    async def chat_completions(self, request: Request) -> Response:
        owner = self.owner(request)
        body = await _read_json(request, self.settings.max_body_bytes)
        return await self._respond(self.svc.chat_turn(body, owner))

    def _envelope(self, turn: Turn, stream: bool) -> dict[str, Any]:
        chat = turn.kind == "chat"
        obj = ("chat.completion" if chat else "text_completion") + (".chunk" if stream and chat else "")
        return {"id": ("chatcmpl-" if chat else "cmpl-") + turn.id, "object": obj, "created": turn.created,
                "model": self.settings.model_id}

    def _choice(self, turn: Turn, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if turn.kind == "text":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if text is None:
            delta: dict[str, Any] = {}
        else:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    async def _respond(self, turn: Turn) -> Response:
        if turn.sampling.stream:
            return _TurnResponse(turn, self._stream(turn))
        try:
            parts, result = [], None
            async for kind, payload in turn.events():
                if kind == "text":
                    parts.append(payload)
                else:
                    result = payload
            turn.commit(result)
        finally:
            turn.close()
        out = self._envelope(turn, stream=False)
        if turn.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                      "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        return JSONResponse({**out, "choices": [choice], "usage": _usage(result)})

    async def _stream(self, turn: Turn):
        env = self._envelope(turn, stream=True)
        if turn.kind == "chat":
            yield _sse({**env, "choices": [self._choice(turn, "", None, first=True)]})
        try:
            async for kind, payload in turn.events():
                if kind == "text":
                    if payload:
                        yield _sse({**env, "choices": [self._choice(turn, payload, None)]})
                    continue
                turn.commit(payload)  # before the final chunk: a client that saw it knows the turn is stored
                yield _sse({**env, "choices": [self._choice(turn, None, payload.finish_reason)]})
                if turn.sampling.include_usage:
                    yield _sse({**env, "choices": [], "usage": _usage(payload)})
        except ApiError as err:  # headers are sent: report in the stream, as OpenAI does
            yield _sse(err.body())
        yield _sse("[DONE]")


async def _api_error(request: Request, exc: Exception) -> Response:
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error_response(ApiError(exc.status_code, str(exc.detail), code))


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error_response(ApiError(500, "internal server error", "internal_error", type="server_error"))


def create_app(service: Service) -> Starlette:
    """The ASGI app. Its lifespan starts the engine and, at shutdown, stops it and closes the database."""
    api = Api(service)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            service.close()

    routes = [
        Route("/", api.page, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/sessions", api.create_session, methods=["POST"]),
        Route("/v1/sessions", api.list_sessions, methods=["GET"]),
        Route("/v1/sessions/{sid}", api.get_session, methods=["GET"]),
        Route("/v1/sessions/{sid}", api.delete_session, methods=["DELETE"]),
        Route("/v1/sessions/{sid}/messages", api.session_messages, methods=["GET"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.service = service
    app.state.started = time.time()
    return app
