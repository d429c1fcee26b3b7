"""The HTTP API in-process (Starlette's TestClient): OpenAI shapes, sessions, errors, keys, restarts, LRU."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from megalodon_lm.data.tokenizer import ByteTokenizer
from megalodon_lm.generation import generate
from megalodon_lm.serve.template import ChatTemplate

USER = [{"role": "user", "content": "hello there"}]


def chat(client, session=None, content="hello there", status=200, **kw):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, **kw}
    if session is not None:
        body["session_id"] = session
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    return r.json()


def reply(data) -> str:
    return data["choices"][0]["message"]["content"]


def test_models_health_and_shapes(make_app, loaded):
    model, tok = loaded
    with TestClient(make_app()) as c:
        assert c.get("/health").json()["status"] == "ok"
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
        data = chat(c)
        assert data["object"] == "chat.completion" and data["choices"][0]["finish_reason"] == "length"
        assert data["usage"]["completion_tokens"] == 12
        # Stateless chat = the template's text through `generate`.
        prompt = tok.encode(ChatTemplate().render([("user", "hello there")]))
        assert data["usage"]["prompt_tokens"] == len(prompt)
        ref = generate(model, [prompt], max_new_tokens=12, temperature=0)[0].tolist()
        assert reply(data) == ByteTokenizer().decode(ref)
        comp = c.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0,
                                               "ignore_eos": True}).json()
        ref = generate(model, [tok.encode("abc")], max_new_tokens=5, temperature=0)[0].tolist()
        assert comp["object"] == "text_completion" and comp["choices"][0]["text"] == ByteTokenizer().decode(ref)


def _events(c, body):
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def test_streaming_equals_non_streaming(make_app):
    with TestClient(make_app()) as c:
        whole = reply(chat(c, max_tokens=20))
        events = _events(c, {"messages": USER, "max_tokens": 20, "temperature": 0, "ignore_eos": True,
                             "stream": True, "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
        assert text == whole
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 20


def test_session_feeds_only_new_tokens_and_reports_constant_state(make_app, loaded):
    model, tok = loaded
    with TestClient(make_app()) as c:
        sid = c.post("/v1/sessions").json()["id"]
        info0 = c.get(f"/v1/sessions/{sid}").json()
        assert {"id", "tokens", "state_bytes", "created", "updated"} <= set(info0) and info0["tokens"] == 0
        first = chat(c, sid, "hi")
        info1 = c.get(f"/v1/sessions/{sid}").json()
        # Turn 1 is the stateless chat: same tokens. The state has consumed all but the pending last token.
        assert reply(first) == reply(chat(c, None, "hi"))
        assert info1["tokens"] == first["usage"]["prompt_tokens"] + 12 - 1
        second = chat(c, sid, "more")
        # Only the new message (plus the pending token) is fed.
        cont = ChatTemplate().continuation([("user", "more")], "")
        assert second["usage"]["prompt_tokens"] == 1 + len(tok.encode(cont))
        # The same stream through `generate` in one piece gives the same reply.
        stream = tok.encode(ChatTemplate().render([("user", "hi")]))
        out = generate(model, [stream], max_new_tokens=12, temperature=0)[0].tolist()
        out2 = generate(model, [stream + out + tok.encode(cont)], max_new_tokens=12, temperature=0)[0].tolist()
        assert reply(second) == tok.decode(out2)
        sizes = set()
        for i in range(6):
            chat(c, sid, "x" * (5 + 7 * i))
            info = c.get(f"/v1/sessions/{sid}").json()
            assert info["state_bytes"] <= info["max_state_bytes"]
            sizes.add(info["state_bytes"])
        msgs = c.get(f"/v1/sessions/{sid}/messages").json()["data"]
        assert len(msgs) == 16 and msgs[0] == {**msgs[0], "role": "user", "content": "hi"}
        assert [s["id"] for s in c.get("/v1/sessions").json()["data"]] == [sid]
        assert c.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
        assert c.get(f"/v1/sessions/{sid}").status_code == 404


def _conversation(c, sid, turns, temperature):
    return [reply(chat(c, sid, f"turn {i}", temperature=temperature)) for i in range(turns)]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_restart_changes_nothing(make_app, tmp_path, temperature):
    """Greedy and seeded sampling: 4 turns with a server restart after turn 2 equal 4 turns without one."""
    with TestClient(make_app(db=tmp_path / "a.db")) as c:
        sid = c.post("/v1/sessions", json={"seed": 7}).json()["id"]
        straight = _conversation(c, sid, 4, temperature)
    with TestClient(make_app(db=tmp_path / "b.db")) as c:
        sid = c.post("/v1/sessions", json={"seed": 7}).json()["id"]
        before = _conversation(c, sid, 2, temperature)
    with TestClient(make_app(db=tmp_path / "b.db")) as c:  # a new server process' worth of state: the db only
        after = [reply(chat(c, sid, f"turn {i}", temperature=temperature)) for i in (2, 3)]
    assert before + after == straight
    if temperature:
        assert len(set(straight)) > 1


def test_lru_bounds_memory_and_evicted_sessions_continue(make_app, tmp_path):
    with TestClient(make_app(db=tmp_path / "ref.db")) as c:
        ref = c.post("/v1/sessions").json()["id"]
        expected = _conversation(c, ref, 3, 0.0)
    app = make_app(db=tmp_path / "lru.db", max_cached_sessions=2)
    with TestClient(app) as c:
        manager = app.state.service.sessions
        sids = [c.post("/v1/sessions").json()["id"] for _ in range(4)]
        got = {s: [] for s in sids}
        for i in range(3):
            for s in sids:
                got[s].append(reply(chat(c, s, f"turn {i}")))
                assert len(manager.cached_ids()) <= 2
        assert all(v == expected for v in got.values())
        assert manager.cached_ids() == sids[-2:]


def test_api_keys_and_ownership(make_app):
    with TestClient(make_app(api_keys=("key-a", "key-b"))) as c:
        a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-a"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # open
        sid = c.post("/v1/sessions", headers=a).json()["id"]
        assert c.get(f"/v1/sessions/{sid}", headers=a).status_code == 200
        for method, path in (("GET", f"/v1/sessions/{sid}"), ("DELETE", f"/v1/sessions/{sid}"),
                             ("GET", f"/v1/sessions/{sid}/messages")):
            r = c.request(method, path, headers=b)
            assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        r = c.post("/v1/chat/completions", headers=b, json={"session_id": sid, "messages": USER, "max_tokens": 2})
        assert r.status_code == 404
        assert c.get("/v1/sessions", headers=b).json()["data"] == []
        assert len(c.get("/v1/sessions", headers=a).json()["data"]) == 1


BAD_BODIES = [
    (b"{not json", "invalid_json", None),
    (b"[1, 2]", "invalid_type", None),
    (json.dumps({"messages": "hi"}).encode(), "invalid_type", "messages"),
    (json.dumps({"messages": []}).encode(), "invalid_value", "messages"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "invalid_value", "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "invalid_type", "messages[0].content"),
    (json.dumps({"messages": USER, "max_tokens": 0}).encode(), "invalid_value", "max_tokens"),
    (json.dumps({"messages": USER, "max_tokens": -3}).encode(), "invalid_value", "max_tokens"),
    (json.dumps({"messages": USER, "max_tokens": 10**6}).encode(), "invalid_value", "max_tokens"),
    (json.dumps({"messages": USER, "max_tokens": "ten"}).encode(), "invalid_type", "max_tokens"),
    (json.dumps({"messages": USER, "top_p": 0}).encode(), "invalid_value", "top_p"),
    (json.dumps({"messages": USER, "top_p": 1.01}).encode(), "invalid_value", "top_p"),
    (json.dumps({"messages": USER, "temperature": "hot"}).encode(), "invalid_value", "temperature"),
    (json.dumps({"messages": USER, "stop": [""]}).encode(), "invalid_value", "stop"),
    (json.dumps({"messages": USER, "seed": 1.5}).encode(), "invalid_value", "seed"),
    (json.dumps({"messages": USER, "stream": "yes"}).encode(), "invalid_type", "stream"),
    (json.dumps({"messages": USER, "n": 2}).encode(), "unsupported_value", "n"),
    (json.dumps({"messages": USER, "session_id": 12}).encode(), "invalid_type", "session_id"),
]


@pytest.mark.parametrize("body,code,param", BAD_BODIES)
def test_bad_chat_bodies_are_400_in_openai_shape(make_app, body, code, param):
    with TestClient(make_app(max_tokens_limit=64)) as c:
        r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error")


def test_other_bad_requests(make_app, loaded, tmp_path):
    with TestClient(make_app(max_body_bytes=2000)) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 5000}]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = c.post("/v1/chat/completions", json={"session_id": "sess-nope", "messages": USER})
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        r = c.post("/v1/chat/completions", json={"model": "gpt-4", "messages": USER})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/completions", json={"prompt": ""})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert c.get("/v1/chat/completions").status_code == 405
        assert c.get("/v1/nothing").json()["error"]["code"] == "not_found"
        sid = c.post("/v1/sessions").json()["id"]
    # The same database under another model: the session's state does not apply.
    model, tok = loaded
    other = type(model)(model.config).eval()
    with TestClient(make_app(db=tmp_path / "sessions.sqlite3", model=(other, tok))) as c:
        r = c.post("/v1/chat/completions", json={"session_id": sid, "messages": USER})
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_mismatch"
