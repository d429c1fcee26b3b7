"""`megalodon-lm serve MODEL_DIR`: the OpenAI-compatible server with persistent sessions (docs/serving.md)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch

SERVE_HELP = {
    "model_dir": "a run directory (megalodon-lm train) or a transformers directory (megalodon-lm export-hf)",
    "host": "interface to listen on (loopback only by default) [127.0.0.1]",
    "port": "TCP port; 0 = any free port (the banner names it) [8000]",
    "db": "SQLite session database [MODEL_DIR/sessions.sqlite3]",
    "max_batch": "requests decoded together at most; more wait in a queue [16]",
    "api_key": "require 'Authorization: Bearer KEY'; repeatable, each key owns its sessions [env "
               "MEGALODON_API_KEY, comma-separated; none = open]",
    "device": "auto, cpu, cuda or cuda:N [auto]",
    "dtype": "model weights dtype: float32, bfloat16, float16 or float64 [float32]",
    "compile": "torch.compile the batched decode step (a compile per batch size seen) [off]",
    "prefill_chunk": "prompt tokens fed per engine step in all; bounds how long decoding rows wait [512]",
    "max_tokens": "largest max_tokens a request may ask for [4096]",
    "default_max_tokens": "max_tokens when a request gives none [256]",
    "max_body": "largest request body in bytes [1048576]",
    "max_cached_sessions": "session states kept in memory; older ones are read back from the database [64]",
    "model_id": "the model name in /v1/models and responses [the directory's name]",
    "threads": "torch CPU threads [torch's default]",
    "log_level": "uvicorn log level [warning]",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DEFAULT_DB = "sessions.sqlite3"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    h = SERVE_HELP
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with persistent sessions",
                              description="Serve a Megalodon model: OpenAI-compatible completions and chat "
                                          "completions, sessions of unlimited history at constant memory stored in "
                                          "SQLite, and a chat page at /. Defaults in brackets.")
    p.add_argument("model_dir", metavar="RUN_DIR_OR_HF_DIR", help=h["model_dir"])
    p.add_argument("--host", default="127.0.0.1", help=h["host"])
    p.add_argument("--port", type=int, default=8000, help=h["port"])
    p.add_argument("--db", default=None, metavar="PATH", help=h["db"])
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help=h["max_batch"])
    p.add_argument("--api-key", action="append", default=None, metavar="KEY", help=h["api_key"])
    p.add_argument("--device", default="auto", help=h["device"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help=h["dtype"])
    p.add_argument("--compile", action="store_true", help=h["compile"])
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="N", help=h["prefill_chunk"])
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N", help=h["max_tokens"])
    p.add_argument("--default-max-tokens", type=int, default=256, metavar="N", help=h["default_max_tokens"])
    p.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES", help=h["max_body"])
    p.add_argument("--max-cached-sessions", type=int, default=64, metavar="N", help=h["max_cached_sessions"])
    p.add_argument("--model-id", default=None, help=h["model_id"])
    p.add_argument("--threads", type=int, default=None, help=h["threads"])
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help=h["log_level"])
    p.set_defaults(func=run_serve)
    return p


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = args.api_key if args.api_key else os.environ.get("MEGALODON_API_KEY", "").split(",")
    return tuple(k.strip() for k in keys if k.strip())


def _check(args: argparse.Namespace) -> None:
    for name in ("max_batch", "prefill_chunk", "max_tokens", "default_max_tokens", "max_body", "max_cached_sessions"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must lie in [0, 65535], got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # connections made right after the banner wait in the backlog until uvicorn is up
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def run_serve(args: argparse.Namespace) -> int:
    """Handler of `megalodon-lm serve`: load, bind, print the banner, serve until Ctrl-C / SIGTERM."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise ValueError(f"serve needs the 'serve' extra: pip install 'megalodon-lm[serve]' ({exc})") from exc
    from ..device import resolve_device
    from ..runtime import bound_cpu_allocator
    from .loading import load_model_dir
    from .service import ServeSettings, Service
    from .template import ChatTemplate

    _check(args)
    bound_cpu_allocator()  # a server runs for days: large blocks go back to the system when freed
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    device = resolve_device(args.device)
    print(f"megalodon-lm serve: loading {model_dir} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model_dir(model_dir, device, DTYPES[args.dtype])
    settings = ServeSettings(model_id=args.model_id or model_dir.resolve().name, api_keys=_api_keys(args),
                             max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                             max_tokens_limit=args.max_tokens, default_max_tokens=args.default_max_tokens,
                             max_body_bytes=args.max_body, max_cached_sessions=args.max_cached_sessions,
                             compile=args.compile)
    db = Path(args.db) if args.db else model_dir / DEFAULT_DB
    service = Service(model, tokenizer, db, settings, ChatTemplate.from_dir(model_dir))
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    keys = f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "no API key"
    print(f"megalodon-lm serve: http://{shown}:{port}/ (model {settings.model_id}, {model.num_parameters():,} "
          f"parameters, {device}, db {db}, max batch {args.max_batch}, {keys})", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(service), log_level=args.log_level, timeout_graceful_shutdown=30,
                            access_log=args.log_level in ("info", "debug"))
    # Ctrl-C / SIGTERM: uvicorn stops accepting, lets in-flight turns finish (up to 30 s; then they are
    # cancelled and not committed), runs the lifespan shutdown (engine stopped, database closed) and
    # re-raises the signal, so the exit status is the shell's 130 / 143.
    uvicorn.Server(config).run(sockets=[sock])
    return 0
