"""Constant-memory prefill: a 1,000,000-token random prompt through the `tiny` preset, then a short decode.

    python benchmarks/long_prefill.py                        # 1M tokens (minutes on a CPU)
    python benchmarks/long_prefill.py --tokens 50000         # smoke run
    python benchmarks/long_prefill.py --tune-allocator       # glibc keeps freed memory (see runtime.py)

The prompt goes through `megalodon_lm.generation.prefill` in segments of --segment pieces of --piece tokens
(each forward projects only the last position's logits, `last_logits_only=True`), carrying the stream state;
then `stream_generate` decodes --decode greedy tokens from that state. Printed: time and tokens/s of both, the
peak RSS (resource.getrusage ru_maxrss) and the RSS progression, and the state's bytes, which stay the same
whatever the prompt length (the prompt tensor itself, 8 bytes per token, is the only O(length) memory).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch
from _common import current_rss_bytes, fmt_bytes, set_threads

from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.generation import prefill, stream_generate
from megalodon_lm.runtime import tune_cpu_allocator


def peak_rss_bytes() -> int:
    """ru_maxrss: KiB on Linux, bytes on macOS."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000, help="prompt length [1000000]")
    p.add_argument("--piece", type=int, default=8192, help="prompt tokens per forward [8192]")
    p.add_argument("--segment", type=int, default=8, help="pieces per prefill call, between progress lines [8]")
    p.add_argument("--decode", type=int, default=16, help="greedy tokens decoded after the prefill [16]")
    p.add_argument("--preset", default="tiny", help="model preset [tiny]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [all available cores]")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt [0]")
    p.add_argument("--tune-allocator", action="store_true", help="call megalodon_lm.runtime.tune_cpu_allocator()")
    args = p.parse_args(argv)
    if args.tokens < 2 or args.piece < 1 or args.segment < 1 or args.decode < 1:
        p.error("--tokens must be >= 2; --piece, --segment and --decode >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tuned = tune_cpu_allocator() if args.tune_allocator else False
    threads = set_threads(args.threads)
    torch.manual_seed(args.seed)
    model = MegalodonLM(MegalodonConfig.from_preset(args.preset)).eval()
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(args.seed))
    print(f"preset {args.preset} ({model.num_parameters():,} parameters, chunk {cfg.chunk_size}), "
          f"{args.tokens:,}-token prompt, pieces of {args.piece}, {threads} threads, allocator tuned: {tuned}")
    rss_start = current_rss_bytes()
    print(f"RSS before the prefill: {fmt_bytes(rss_start)}")

    # Segment k feeds prompt[a:b] and leaves prompt[b] pending; segment k+1 starts with it (see the
    # state contract in megalodon_lm.generation.generate). The last segment leaves the last token pending.
    step = args.piece * args.segment
    state, done, t0 = None, 0, time.perf_counter()
    while done < args.tokens - 1:
        end = min(done + step, args.tokens - 1)
        state, _ = prefill(model, prompt[:, done:end + 1], state=state, prefill_chunk=args.piece)
        done = end
        dt = time.perf_counter() - t0
        print(f"  {done + 1:>10,} tokens  {dt:8.1f} s  {(done + 1) / dt:8.0f} tokens/s  "
              f"RSS {fmt_bytes(current_rss_bytes())}  state {fmt_bytes(state.nbytes())}", flush=True)
    prefill_s = time.perf_counter() - t0

    # One single-token forward per step (the first one feeds the last prompt token); timed step by step
    # because a shared CPU makes single steps noisy: the median is the figure to compare.
    steps, t1 = [], time.perf_counter()
    for _ in stream_generate(model, prompt[:, -1:], state=state, max_new_tokens=args.decode, temperature=0):
        steps.append(time.perf_counter() - t1 - sum(steps))
    decode_s = time.perf_counter() - t1
    assert len(steps) == args.decode

    print(f"prefill: {args.tokens:,} tokens in {prefill_s:.1f} s = {args.tokens / prefill_s:,.0f} tokens/s")
    print(f"decode:  {args.decode} tokens in {decode_s:.2f} s = {args.decode / decode_s:.1f} tokens/s "
          f"(median {1000 * statistics.median(steps):.1f} ms/token)")
    print(f"state:   {state.nbytes():,} bytes ({fmt_bytes(state.nbytes())}) at position {int(state.positions[0]):,}")
    print(f"memory:  peak RSS {fmt_bytes(peak_rss_bytes())} (ru_maxrss); RSS now {fmt_bytes(current_rss_bytes())}, "
          f"before the prefill {fmt_bytes(rss_start)}; the prompt tensor is {fmt_bytes(prompt.numel() * 8)}")


if __name__ == "__main__":
    main()
