"""OpenAI-compatible request parsing: every bad input becomes an `ApiError` (4xx, OpenAI's error shape).

Checked by hand rather than by a schema library so that each message names the parameter and the
response is exactly `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An error answered as JSON {"error": {...}} with HTTP `status`."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code, param)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(None, f"the request body is not valid JSON: {exc}", "invalid_json") from exc
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}", "invalid_type")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Sampling:
    """Options shared by completions and chat completions."""

    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool = False  # extension (as in vLLM): generate through EOS, e.g. for fixed-length benchmarks


def parse_sampling(body: dict[str, Any], default_max_tokens: int, max_tokens_limit: int) -> Sampling:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(default_max_tokens, max_tokens_limit)
    elif not _is_int(max_tokens):
        raise bad("max_tokens", f"max_tokens must be an integer, got {max_tokens!r}", "invalid_type")
    elif not 1 <= max_tokens <= max_tokens_limit:
        raise bad("max_tokens", f"max_tokens must lie in [1, {max_tokens_limit}] (this server's limit), "
                                f"got {max_tokens}")
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise bad("temperature", f"temperature must be a number in [0, 2] (0 = greedy), got {temperature!r}")
    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise bad("top_p", f"top_p must be a number in (0, 1], got {top_p!r}")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise bad("top_k", f"top_k must be an integer >= 1 (0 or -1 = no top-k filter), got {top_k!r}")
    penalty = body.get("repetition_penalty")
    if penalty is not None and (not _is_number(penalty) or penalty <= 0):
        raise bad("repetition_penalty", f"repetition_penalty must be a number > 0 (1 = none), got {penalty!r}")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 16 or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "stop must be a non-empty string or a list of at most 16 non-empty strings")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise bad("seed", f"seed must be a non-negative integer below 2**63, got {seed!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("stream", f"stream must be a boolean, got {stream!r}", "invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options", "stream_options must be an object", "invalid_type")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos", f"ignore_eos must be a boolean, got {ignore_eos!r}", "invalid_type")
    n = body.get("n", 1)
    if n not in (1, None):
        raise bad("n", f"only n=1 is supported, got {n!r}", "unsupported_value")
    return Sampling(max_tokens, float(temperature), None if top_p is None else float(top_p),
                    top_k if top_k and top_k > 0 else None, None if penalty is None else float(penalty), stops,
                    seed, bool(stream), bool(opts.get("include_usage", False)), ignore_eos)


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text ones
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"messages[{i}].content", "only text content parts ({\"type\": \"text\", ...}) are "
                                                    "supported", "unsupported_value")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content", f"message content must be a string, got {type(content).__name__}",
              "invalid_type")


def parse_messages(body: dict[str, Any]) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad("messages", "messages must be a list of {\"role\", \"content\"} objects", "invalid_type")
    if not messages:
        raise bad("messages", "messages is empty: send at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "each message must be an object", "invalid_type")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for system
            role = "system"
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"role must be one of {list(ROLES)}, got {role!r}")
        out.append((role, _content(m, i)))
    return out


def parse_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("prompt", "prompt must be a string (or a list holding one string)", "invalid_type")
    if not prompt:
        raise bad("prompt", "prompt is empty")
    return prompt


def parse_session_id(body: dict[str, Any]) -> str | None:
    sid = body.get("session_id")
    if sid is not None and not isinstance(sid, str):
        raise bad("session_id", f"session_id must be a string, got {type(sid).__name__}", "invalid_type")
    return sid
