"""Peak memory of one training step on a long sequence: chunk parallelism (K ranks) vs one process.

    python benchmarks/chunk_parallel_memory.py                       # nano preset, 32K tokens, K = 2, CPU
    python benchmarks/chunk_parallel_memory.py --preset tiny --seq-len 16K --k 2

One process runs forward + backward on the whole sequence; then K processes (launched with torchrun, gloo)
run the chunk-parallel step on K/K of it each (DDP over the K ranks). Each process measures its peak RSS
growth over the step (`/proc/self/clear_refs` reset of VmHWM before the step, minus the RSS before it), i.e.
activations, gradients and communication buffers, not the Python/torch baseline or the weights. Prints a
table and writes benchmarks/results/chunk_parallel_memory.json. Memory does not depend on machine load;
the step times printed alongside do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402 - the path set-up above makes the helpers importable as a script
    REPO_ROOT,
    RESULTS_DIR,
    current_rss_bytes,
    fmt_bytes,
    max_rss_bytes,
    parse_lengths,
    print_table,
    save_json,
    system_info,
    trim_and_reset_peak_rss,
)


def _model(preset: str):
    from megalodon_lm.models import MegalodonConfig, MegalodonLM

    torch.manual_seed(0)
    return MegalodonLM(MegalodonConfig.from_preset(preset, vocab_size=256))


def worker(args: argparse.Namespace) -> None:
    """One process's measured step; writes <out>/rank<r>.json."""
    torch.set_num_threads(args.threads)
    model = _model(args.preset)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, args.seq_len), generator=g)
    y = torch.randint(0, 256, (1, args.seq_len), generator=g)
    rank = 0
    if args.k > 1:
        from megalodon_lm.distributed.env import init_from_env
        from megalodon_lm.distributed.parallelize import wrap_model
        from megalodon_lm.distributed.train_step import check_chunk_split, distributed_backward

        ctx = init_from_env(args.k, "cpu")
        rank = ctx.rank
        check_chunk_split(args.seq_len, args.k, model.config.chunk_size)
        module = wrap_model(model, ctx, "ddp")
        p = args.seq_len // args.k
        piece = [(x[:, rank * p : (rank + 1) * p], y[:, rank * p : (rank + 1) * p])]
        import contextlib

        def step():
            return distributed_backward(module, piece, ctx, contextlib.nullcontext)
    else:
        def step():
            loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="mean")
            loss.backward()
            return float(loss)

    reset = trim_and_reset_peak_rss()
    before = current_rss_bytes()
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    peak = max_rss_bytes()
    result = {"rank": rank, "k": args.k, "loss": loss, "step_s": seconds, "rss_before": before, "peak_rss": peak,
              "peak_growth": peak - before, "peak_reset": reset}
    Path(args.out_dir, f"k{args.k}_rank{rank}.json").write_text(json.dumps(result))
    if args.k > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _launch(args: argparse.Namespace, k: int, out: str) -> None:
    common = [__file__, "--worker", "--preset", args.preset, "--seq-len", str(args.seq_len), "--k", str(k),
              "--threads", str(args.threads), "--out-dir", out]
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if k == 1:
        cmd = [sys.executable, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k), "--master-port",
               str(args.port), *common]
    subprocess.run(cmd, check=True, env=env, timeout=args.timeout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--seq-len", default="32K", help="tokens per sequence (e.g. 32K)")
    ap.add_argument("--k", type=int, default=2, help="chunk-parallel ranks")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--port", type=int, default=29517)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=str(RESULTS_DIR / "chunk_parallel_memory.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.seq_len = parse_lengths(str(args.seq_len))[0]
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        _launch(args, 1, tmp)
        _launch(args, args.k, tmp)
        one = json.loads(Path(tmp, "k1_rank0.json").read_text())
        ranks = [json.loads(Path(tmp, f"k{args.k}_rank{r}.json").read_text()) for r in range(args.k)]
    worst = max(r["peak_growth"] for r in ranks)
    rows = [["1 process, whole sequence", fmt_bytes(one["peak_growth"]), "1.00", f"{one['step_s']:.1f}"]]
    rows += [[f"K={args.k}, rank {r['rank']}", fmt_bytes(r["peak_growth"]),
              f"{r['peak_growth'] / one['peak_growth']:.2f}", f"{r['step_s']:.1f}"] for r in ranks]
    print_table(["", "peak RSS growth", "ratio", "step s"], rows,
                title=f"one training step, preset {args.preset}, {args.seq_len} tokens, batch 1, fp32, CPU")
    print(f"worst rank / one process: {worst / one['peak_growth']:.3f} (acceptance: <= 0.6); losses "
          f"{one['loss']:.6f} vs {ranks[0]['loss']:.6f}")
    payload = {"benchmark": "chunk_parallel_memory", "preset": args.preset, "seq_len": args.seq_len, "k": args.k,
               "one_process": one, "ranks": ranks, "worst_ratio": worst / one["peak_growth"],
               "system": system_info(torch.device("cpu"), args.threads)}
    print(f"wrote {save_json(args.out, payload)}")


if __name__ == "__main__":
    main()
