"""`kill -9` of a real `megalodon-lm serve` process mid-turn leaves every session at its previous turn."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _start(run_dir: Path, db: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "megalodon_lm", "serve", str(run_dir), "--port", "0", "--db",
                             str(db), "--threads", "1"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("the server did not start")


def _chat(c: httpx.Client, sid: str, content: str, n: int, **kw):
    return c.post("/v1/chat/completions", json={"session_id": sid, "messages": [{"role": "user", "content": content}],
                                                "max_tokens": n, "temperature": 0, "ignore_eos": True, **kw})


@pytest.mark.slow
def test_kill_9_mid_turn_keeps_the_previous_turn(run_dir, tmp_path):
    db = tmp_path / "kill.sqlite3"
    proc, url = _start(run_dir, db)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            sid = c.post("/v1/sessions").json()["id"]
            assert _chat(c, sid, "first", 10).status_code == 200
            before = c.get(f"/v1/sessions/{sid}").json()
            body = {"session_id": sid, "messages": [{"role": "user", "content": "second"}], "max_tokens": 4000,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            streamed = ""
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"content"' in line:
                        streamed += __import__("json").loads(line[6:])["choices"][0]["delta"].get("content", "")
                    if len(streamed) >= 20:
                        os.kill(proc.pid, signal.SIGKILL)  # mid-turn: the reply is still being generated
                        break
            proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, url = _start(run_dir, db)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            after = c.get(f"/v1/sessions/{sid}").json()
            keys = ("tokens", "turns", "messages", "state_bytes")
            assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
            # Continuing from turn 1 regenerates the same reply the killed server was streaming.
            again = _chat(c, sid, "second", 40).json()["choices"][0]["message"]["content"]
            assert again.startswith(streamed[:20]) or streamed.startswith(again)
            assert c.get(f"/v1/sessions/{sid}").json()["turns"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)  # a clean shutdown: uvicorn finishes, then re-raises the signal
        assert proc.wait(60) in (0, -signal.SIGTERM)
    # The database was closed: SQLite folds the write-ahead log back in and removes it on the last close.
    assert db.exists() and not Path(f"{db}-wal").exists()
