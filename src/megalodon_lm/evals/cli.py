"""`megalodon-lm eval ppl`: bits per byte vs context length for a trained run directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..outputs import check_output_file, write_text_atomic
from ..runtime import add_threads_argument, check_threads, set_threads
from .harness import add_harness_parser
from .ppl import RESET_PARTS, bpb_vs_context, load_documents, parse_contexts, parse_resets, positive_int


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` (with the sub-subcommand `ppl`) on an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser("eval", help="evaluate a trained run", description="Evaluation harnesses.")
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    _add_ppl_parser(sub)
    add_harness_parser(sub)
    return p


def _add_ppl_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("ppl", help="bits per byte vs context length (same scored tokens at every length)",
                       description="Score each document's last --score-tokens tokens at every context length "
                                   "and report bits per byte. 'whole' streams the document from its start with "
                                   "the model state carried. Defaults in brackets.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `megalodon-lm train`")
    p.add_argument("--data", action="append", required=True, metavar="PATH",
                   help="evaluation text: file, directory or glob (.txt/.jsonl, optionally .gz/.xz); repeatable")
    p.add_argument("--contexts", default="512,2048,8192,whole", metavar="LIST",
                   help="comma-separated context lengths in tokens, 'whole' = whole prefix [512,2048,8192,whole]")
    p.add_argument("--score-tokens", type=int, default=4096, metavar="N",
                   help="tokens scored at the end of each document [4096]")
    p.add_argument("--max-docs", type=int, default=None, metavar="N", help="use at most N documents [all]")
    p.add_argument("--refresh", action="store_true",
                   help="reference TimestepNorm statistics refresh in the whole-prefix stream (~4x compute)")
    p.add_argument("--reset", default=None, metavar="LIST",
                   help="reset ablation: comma-separated memory paths to reset in an extra whole-prefix stream each, "
                        f"from {','.join(RESET_PARTS)} (cema = CEMA state, norm = TimestepNorm statistics); "
                        "same scored tokens, so whole minus reset = what that path carries [none]")
    p.add_argument("--reset-every", default="chunk", metavar="N|chunk",
                   help="reset period in tokens from the document start, or 'chunk' (the attention chunk) [chunk]")
    p.add_argument("--step", type=int, default=None, metavar="N", help="checkpoint step [latest]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto: cuda when available]")
    p.add_argument("--piece-tokens", type=int, default=4096, metavar="N", help="tokens per forward [4096]")
    p.add_argument("--out", default=None, metavar="JSON", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a BPB vs context plot (needs matplotlib)")
    add_threads_argument(p)
    p.set_defaults(func=run_eval_ppl)
    return p


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table: context, bpb, nll/token, scored tokens, scored bytes."""
    width = max([10, *(len(r["label"]) for r in result["results"])])
    lines = [f"{'context':>{width}} {'bpb':>9} {'nll/tok':>9} {'tokens':>9} {'bytes':>9}"]
    for r in result["results"]:
        lines.append(f"{r['label']:>{width}} {r['bpb']:9.4f} {r['nll_per_token']:9.4f} {r['n_tokens']:9d} "
                     f"{r['n_bytes']:9d}")
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: str | Path) -> bool:
    """BPB vs context (log x); the whole prefix as a dashed line. False (no file) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    finite = sorted((r["context"], r["bpb"]) for r in result["results"] if r["context"] is not None)
    fig, ax = plt.subplots(figsize=(6, 4))
    if finite:
        ax.plot([c for c, _ in finite], [b for _, b in finite], marker="o", label="context c")
        ax.set_xscale("log", base=2)
    for r in result["results"]:
        if r["context"] is None:
            reset = r.get("reset")
            ax.axhline(r["bpb"], linestyle="--" if reset is None else ":",
                       color="tab:red" if reset is None else None,
                       label="whole prefix" if reset is None else f"whole prefix, {r['label'][7:]}")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"BPB vs context ({result['n_documents']} docs, last {result['score_tokens']} tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def parse_reset_every(spec: str) -> int | None:
    """'chunk' -> None (the model's attention chunk), '512' -> 512. Raises ValueError otherwise."""
    return None if spec.strip().lower() == "chunk" else positive_int(spec.strip(), "--reset-every", "chunk")


def _check_args(args: argparse.Namespace) -> list[int | None]:
    if args.score_tokens < 1:
        raise ValueError(f"--score-tokens must be >= 1, got {args.score_tokens}")
    if args.max_docs is not None and args.max_docs < 1:
        raise ValueError(f"--max-docs must be >= 1, got {args.max_docs}")
    if args.piece_tokens < 1:
        raise ValueError(f"--piece-tokens must be >= 1, got {args.piece_tokens}")
    check_threads(args.threads)
    # Output paths are checked before the (long) evaluation: results that cannot be written would be lost.
    if args.out:
        check_output_file(args.out, "--out")
    if args.plot:
        check_output_file(args.plot, "--plot")
    return parse_contexts(args.contexts)


def run_eval_ppl(args: argparse.Namespace) -> int:
    """Handler of `megalodon-lm eval ppl`: table to stdout, optional JSON and plot. Returns 0."""
    from ..device import resolve_device
    from ..training.loading import load_run  # lazy: keeps `--help` fast

    contexts = _check_args(args)
    resets = parse_resets(args.reset) if args.reset else []
    reset_every = parse_reset_every(args.reset_every)
    device = resolve_device(args.device)
    set_threads(args.threads)
    documents = load_documents(args.data, args.max_docs)
    model, tokenizer = load_run(args.run_dir, device=device, step=args.step)
    # A bar on a terminal; elsewhere (logs, CI) one line per context length as it finishes.
    bar = sys.stderr.isatty()
    result = bpb_vs_context(model, tokenizer, documents, contexts, args.score_tokens, refresh=args.refresh,
                            piece_tokens=args.piece_tokens, resets=resets, reset_every=reset_every, progress=bar,
                            log=None if bar else (lambda line: print(line, file=sys.stderr, flush=True)))
    result["run_dir"] = str(args.run_dir)
    print(format_table(result), flush=True)  # on stdout first: a failed write below loses nothing
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    try:
        if args.plot and not write_plot(result, args.plot):
            print("note: matplotlib is not installed; no plot written", file=sys.stderr)
    except OSError as exc:
        raise ValueError(f"cannot write --plot {args.plot}: {exc.strerror or exc}") from exc
    return 0
