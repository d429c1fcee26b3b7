"""A real uvicorn server on 127.0.0.1 (ephemeral port): the official openai client, concurrent clients,
and a client that disconnects mid-stream."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from .helpers import live_server


def _chat_body(content, **kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "ignore_eos": True, **kw}


def test_official_openai_client(make_app):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    with live_server(make_app(api_keys=("k1",))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny"]
        whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hey"}],
                                               max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 16
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hey"}],
                                                max_tokens=16, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert text == whole.choices[0].message.content
        comp = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0)
        assert comp.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=[], max_tokens=4)
        assert err.value.body["code"] == "invalid_value"
        bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_concurrent_http_clients_get_what_each_gets_alone(make_app):
    """8 concurrent chat requests of different lengths (greedy) equal the same requests one at a time."""
    prompts = [("abc " * (i + 1)) * (1 + 3 * i) for i in range(8)]
    lengths = [6 + 2 * i for i in range(8)]
    with live_server(make_app(max_batch=8, prefill_chunk=64)) as url, httpx.Client(base_url=url, timeout=120) as c:
        alone = [c.post("/v1/chat/completions", json=_chat_body(p, max_tokens=n)).json()
                 for p, n in zip(prompts, lengths, strict=True)]
        together: list = [None] * 8

        def go(i):
            together[i] = httpx.post(url + "/v1/chat/completions", timeout=120,
                                     json=_chat_body(prompts[i], max_tokens=lengths[i])).json()

        threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for a, b in zip(alone, together, strict=True):
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert b["usage"] == a["usage"]


def test_disconnect_mid_stream_leaves_the_previous_turn(make_app):
    app = make_app()
    service = app.state.service
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        sid = c.post("/v1/sessions").json()["id"]
        c.post("/v1/chat/completions", json={**_chat_body("first", max_tokens=8), "session_id": sid})
        before = c.get(f"/v1/sessions/{sid}").json()
        body = {**_chat_body("second", max_tokens=4000), "session_id": sid, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 5:
                    break  # leaving the block closes the connection mid-reply
        for _ in range(200):  # the engine drops the row at its next step
            if service.engine.load()["decoding"] == 0:
                break
            threading.Event().wait(0.05)
        assert service.engine.load()["decoding"] == 0
        after = c.get(f"/v1/sessions/{sid}").json()
        assert {k: after[k] for k in ("tokens", "turns", "messages", "state_bytes")} == \
               {k: before[k] for k in ("tokens", "turns", "messages", "state_bytes")}
        # The session is free again and continues from turn 1.
        r = c.post("/v1/chat/completions", json={**_chat_body("second", max_tokens=8), "session_id": sid})
        assert r.status_code == 200 and c.get(f"/v1/sessions/{sid}").json()["turns"] == 2
        msgs = c.get(f"/v1/sessions/{sid}/messages").json()["data"]
        assert [m["content"] for m in msgs if m["role"] == "user"] == ["first", "second"]
        assert json.dumps(msgs)  # plain JSON
