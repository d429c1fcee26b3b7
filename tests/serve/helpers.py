"""Shared pieces of the serve tests: a tiny random run directory and a real uvicorn server in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import torch

from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.data.tokenizer import ByteTokenizer, save_tokenizer
from megalodon_lm.training.checkpoint import TOKENIZER_DIR, init_run_dir, save_checkpoint

# Chunk 16: sessions and long prompts cross many attention-chunk boundaries.
TINY = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=1, ffn_hidden_dim=64, chunk_size=16,
            norm_num_groups=4, vocab_size=257)


def make_run_dir(path: Path, seed: int = 0, **overrides) -> Path:
    """A run directory holding a seeded random model and the byte tokenizer (no training: seconds)."""
    torch.manual_seed(seed)
    cfg = MegalodonConfig.from_preset("nano", **{**TINY, **overrides})
    model = MegalodonLM(cfg)
    init_run_dir(path, cfg, {"made_by": "tests/serve"}, resume=False)
    save_tokenizer(ByteTokenizer(), path / TOKENIZER_DIR)
    save_checkpoint(path, 0, model, None, None, {"step": 0})
    return path


@contextlib.contextmanager
def live_server(app, timeout: float = 30.0):
    """Serve `app` with uvicorn on 127.0.0.1 at an ephemeral port in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
