"""Load test of `megalodon-lm serve`: concurrent clients, memory over many turns, latency at long history.

Starts the server as a subprocess on 127.0.0.1 (any free port) over a model directory (default: a random
`tiny` model saved as a run directory: speed and memory do not depend on the weights), then
  1. throughput: 1 client, then N concurrent clients, each running turns of `--reply-tokens` tokens in its own
     session (streamed; EOS ignored so every reply has the same length): time to first token p50/p95,
     aggregate generated tokens/s, and the ratio N clients / 1 client;
  2. memory: `--rss-turns` short turns spread over N sessions; the server's RSS after the first 100 turns
     and at the end;
  3. history: one session fed `--history` tokens, one at ~100 tokens; `--latency-turns` turns on each,
     interleaved; median per-turn latency and the ratio.
Errors (non-200 answers, broken streams) are counted. Everything is bounded in count and by `--time-limit`.

    python benchmarks/serve_load.py                      # tiny, 8 clients (several minutes on 2 cores)
    python benchmarks/serve_load.py --quick              # seconds: a smoke run with small numbers
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, fmt_bytes, print_table, save_json, system_info  # noqa: E402


def make_model_dir(path: Path, preset: str) -> Path:
    """A run directory with a seeded random model of `preset` and the byte tokenizer."""
    import torch

    from megalodon_lm import MegalodonConfig, MegalodonLM
    from megalodon_lm.data.tokenizer import ByteTokenizer, save_tokenizer
    from megalodon_lm.training.checkpoint import TOKENIZER_DIR, init_run_dir, save_checkpoint

    torch.manual_seed(0)
    cfg = MegalodonConfig.from_preset(preset, vocab_size=257)
    init_run_dir(path, cfg, {"made_by": "benchmarks/serve_load.py"}, resume=False)
    save_tokenizer(ByteTokenizer(), path / TOKENIZER_DIR)
    save_checkpoint(path, 0, MegalodonLM(cfg), None, None, {"step": 0})
    return path


class Server:
    """`megalodon-lm serve` in a subprocess; its URL from the startup banner, its RSS from /proc."""

    def __init__(self, model_dir: Path, db: Path, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "megalodon_lm", "serve", str(model_dir), "--port", "0", "--db", str(db), *extra]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        self.url = None
        deadline = time.monotonic() + 300
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line and (self.proc.poll() is not None or time.monotonic() > deadline):
                raise RuntimeError("the server did not start")
            m = re.search(r"(http://[\d.]+:\d+)/", line)
            self.url = m.group(1) if m else None
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ttft: list[float] = []
        self.latency: list[float] = []
        self.tokens = 0
        self.turns = 0
        self.errors = 0


def turn(client: httpx.Client, session: str, content: str, max_tokens: int, stats: Stats) -> None:
    """One streamed chat turn in `session`; records time to first token, latency and generated tokens."""
    body = {"session_id": session, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start, first, usage, done = time.perf_counter(), None, None, False
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    first = time.perf_counter()
        if not done or usage is None:
            raise RuntimeError("stream ended early")
    except (httpx.HTTPError, RuntimeError, json.JSONDecodeError):
        with stats.lock:
            stats.errors += 1
        return
    end = time.perf_counter()
    with stats.lock:
        stats.ttft.append((first or end) - start)
        stats.latency.append(end - start)
        stats.tokens += usage["completion_tokens"]
        stats.turns += 1


def new_session(client: httpx.Client) -> str:
    return client.post("/v1/sessions").json()["id"]


def run_clients(url: str, clients: int, turns: int, max_tokens: int, deadline: float, on_turn=None,
                sessions: list[str] | None = None, first_turn: int = 0) -> tuple[Stats, float]:
    """`clients` threads, each with its own session (new, or `sessions[i]`), `turns` turns each (stopping at
    `deadline`)."""
    stats = Stats()

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            sid = new_session(c) if sessions is None else sessions[i]
            for t in range(first_turn, first_turn + turns):
                if time.monotonic() > deadline:
                    return
                turn(c, sid, f"client {i} says hello for the {t}th time", max_tokens, stats)
                if on_turn is not None:
                    on_turn()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats, time.perf_counter() - start


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))


def feed_history(client: httpx.Client, session: str, tokens: int, piece: int = 20000) -> int:
    """Grow a session's history to about `tokens` tokens (byte tokenizer: one token per ASCII character)."""
    text = ("The quick brown fox jumps over the lazy dog. " * (piece // 45 + 1))[:piece]
    while True:
        have = client.get(f"/v1/sessions/{session}").json()["tokens"]
        if have >= tokens:
            return have
        body = {"session_id": session, "messages": [{"role": "user", "content": text[:max(1, tokens - have)]}],
                "max_tokens": 1, "temperature": 0, "ignore_eos": True}
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"feeding history failed: {r.text}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=None, help="a run or HF directory [a random model of --preset]")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--turns", type=int, default=3, help="turns per client in the throughput phase")
    p.add_argument("--reply-tokens", type=int, default=64, help="tokens per reply in the throughput phase")
    p.add_argument("--rss-turns", type=int, default=1000)
    p.add_argument("--rss-reply-tokens", type=int, default=4)
    p.add_argument("--history", type=int, default=100_000)
    p.add_argument("--latency-turns", type=int, default=15)
    p.add_argument("--latency-reply-tokens", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=3600, help="seconds for the whole run")
    p.add_argument("--server-args", default="--prefill-chunk 2048", help="extra `serve` flags")
    p.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.preset, args.clients, args.turns, args.reply_tokens = "nano", 4, 2, 8
        args.rss_turns, args.history, args.latency_turns = 120, 2000, 3
    deadline = time.monotonic() + args.time_limit
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model_dir = Path(args.model_dir) if args.model_dir else make_model_dir(tmp / "model", args.preset)
    db = tmp / "sessions.sqlite3"
    server = Server(model_dir, db, args.server_args.split())
    results: dict = {"system": system_info(__import__("torch").device("cpu"), __import__("torch").get_num_threads()),
                     "args": vars(args), "load_avg_start": os.getloadavg()}
    try:
        with httpx.Client(base_url=server.url, timeout=600) as c:  # warm-up: first-call allocations
            turn(c, new_session(c), "warm up", 8, Stats())
        rss_start = server.rss()
        engine_time = []  # server-side seconds in prefill and decode around each throughput phase
        for clients in (1, args.clients):
            before = httpx.get(server.url + "/health").json()
            stats, wall = run_clients(server.url, clients, args.turns, args.reply_tokens, deadline)
            after = httpx.get(server.url + "/health").json()
            engine_time.append({k: round(after[k] - before[k], 3) for k in ("decode_steps", "decode_seconds",
                                                                           "prefill_pieces", "prefill_seconds")})
            if clients == 1:
                one, t_one = stats, wall
            else:
                many, t_many = stats, wall
        tps_one, tps_many = one.tokens / t_one, many.tokens / t_many

        rss_marks: dict[int, int] = {}
        done = [0]
        lock = threading.Lock()

        def count() -> None:
            with lock:
                done[0] += 1
                if done[0] % 100 == 0 or done[0] == args.rss_turns:
                    rss_marks[done[0]] = server.rss()

        # The same sessions throughout: the first 100 turns, a pause, then up to --rss-turns. RSS is read with no
        # request in flight (retained memory) and also every 100 turns during the load (working memory).
        with httpx.Client(base_url=server.url, timeout=600) as c:
            mem_sessions = [new_session(c) for _ in range(args.clients)]
        first = -(-100 // args.clients)
        mem, _ = run_clients(server.url, args.clients, first, args.rss_reply_tokens, deadline, count,
                             sessions=mem_sessions)
        time.sleep(2)
        rss_idle = {done[0]: server.rss()}
        rest = -(-args.rss_turns // args.clients) - first
        mem2, _ = run_clients(server.url, args.clients, rest, args.rss_reply_tokens, deadline, count,
                              sessions=mem_sessions, first_turn=first)
        mem.errors += mem2.errors
        time.sleep(2)
        rss_idle[done[0]] = server.rss()

        with httpx.Client(base_url=server.url, timeout=3600) as c:
            long_s, short_s = new_session(c), new_session(c)
            t0 = time.perf_counter()
            long_tokens = feed_history(c, long_s, args.history)
            feed_s = time.perf_counter() - t0
            short_tokens = feed_history(c, short_s, 100)
            lat = {long_s: Stats(), short_s: Stats()}
            for i in range(args.latency_turns):
                for s in (long_s, short_s) if i % 2 == 0 else (short_s, long_s):
                    turn(c, s, f"question {i}?", args.latency_reply_tokens, lat[s])
            info_long = c.get(f"/v1/sessions/{long_s}").json()
            info_short = c.get(f"/v1/sessions/{short_s}").json()
        rss_end = server.rss()
        errors = one.errors + many.errors + mem.errors + lat[long_s].errors + lat[short_s].errors
    finally:
        server.stop()
    db_bytes = sum(f.stat().st_size for f in tmp.glob("sessions.sqlite3*"))
    med_long, med_short = statistics.median(lat[long_s].latency), statistics.median(lat[short_s].latency)
    (n_first, rss100), (n_last, rss_last) = sorted(rss_idle.items())
    rows = [
        ["errors", errors, "0"],
        ["TTFT p50 / p95, 1 client (s)", f"{pct(one.ttft, 50):.3f} / {pct(one.ttft, 95):.3f}", ""],
        [f"TTFT p50 / p95, {args.clients} clients (s)", f"{pct(many.ttft, 50):.3f} / {pct(many.ttft, 95):.3f}", ""],
        ["generated tok/s, 1 client", f"{tps_one:.1f}", ""],
        [f"generated tok/s, {args.clients} clients (aggregate)", f"{tps_many:.1f}", ""],
        [f"{args.clients} clients / 1 client", f"{tps_many / tps_one:.2f}x", ">= 3x"],
        ["engine decode / prefill s, 1 client", f"{engine_time[0]['decode_seconds']} / "
                                                f"{engine_time[0]['prefill_seconds']}", ""],
        [f"engine decode / prefill s, {args.clients} clients", f"{engine_time[1]['decode_seconds']} / "
                                                              f"{engine_time[1]['prefill_seconds']}", ""],
        ["server RSS at start", fmt_bytes(rss_start), ""],
        [f"server RSS after {n_first} / {n_last} turns (none in flight)",
         f"{fmt_bytes(rss100)} / {fmt_bytes(rss_last)}", ""],
        [f"RSS after {n_last} vs after {n_first} turns", f"{(rss_last / rss100 - 1) * 100:+.1f}%", "within 10%"],
        ["RSS during the load, every 100 turns (min .. max)",
         f"{fmt_bytes(min(rss_marks.values()))} .. {fmt_bytes(max(rss_marks.values()))}" if rss_marks else "-", ""],
        ["server RSS at the end", fmt_bytes(rss_end), ""],
        [f"history fed: {long_tokens:,} tokens in (s)", f"{feed_s:.1f}", ""],
        [f"turn latency median at {info_long['tokens']:,} tokens of history (s)", f"{med_long:.3f}", ""],
        [f"turn latency median at {info_short['tokens']:,} tokens of history (s)", f"{med_short:.3f}", ""],
        ["long-history / short-history latency", f"{med_long / med_short:.3f}", "within 10%"],
        ["state bytes long / short session", f"{info_long['state_bytes']:,} / {info_short['state_bytes']:,}",
         f"<= {info_long['max_state_bytes']:,}"],
        ["database size (db + wal)", fmt_bytes(db_bytes), ""],
    ]
    print_table(["metric", "value", "target"], rows,
                title=f"serve_load: {args.preset if not args.model_dir else model_dir}, {args.clients} clients, "
                      f"turns of {args.reply_tokens} tokens; load average at start {results['load_avg_start']}")
    results.update(rows={r[0]: r[1] for r in rows}, load_avg_end=os.getloadavg(), short_tokens=short_tokens,
                   rss_every_100_turns=rss_marks, rss_idle=rss_idle, engine_time=engine_time)
    if args.json:
        save_json(args.json, results)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
