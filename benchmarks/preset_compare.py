"""Preset comparison: Megalodon configurations trained on the same tokens in the head-to-head's CPU recipe.

    python benchmarks/preset_compare.py --out runs/presets                       # 3M vs mini, 720 steps each
    python benchmarks/preset_compare.py --configs 3M,mini,tiny --steps 240 --out /tmp/presets

Recipe (benchmarks/head_to_head.py, setting `cpu`): the 20 training books, byte tokenizer, T = 512, batch 8,
warm-up + cosine, AdamW, seed 0, fp32. Each configuration is trained by `megalodon-lm train` in its own process;
reported: parameters, tokens, training time and tokens/s (evaluations excluded), the validation curve (first 8 KiB
of each validation book) and the BPB of the first 64 KiB of each validation book at the training length (the
measurement of the JAX-port reference numbers). `--parallel` trains all configurations at once (on a shared
machine: their speeds are then measured under the same contention). Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from _common import system_info
from _h2h_report import read_curve
from head_to_head import (
    DEFAULT_BOOKS,
    SETTINGS,
    book_split,
    read_book,
    run_worker,
    train_options,
    windowed_bpb,
    write_slices,
)

# name -> (preset, overrides). mini-cema8 is the head-to-head's CPU model; tiny-3Mshape is preset `11M` (`3M`'s
# choices at `tiny`'s width and depth), under the name it was compared with.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "3M": ("3M", {}),
    "mini": ("mini", {}),
    "mini-cema8": ("mini", {"cema_ndim": 8}),
    "tiny": ("tiny", {}),
    "tiny-3Mshape": ("11M", {}),
}


def compare(names: list[str], out: Path, books_dir: Path, steps: int, lr: float, threads: int,
            parallel: bool) -> dict[str, Any]:
    from megalodon_lm.data.dataset import build_corpora
    from megalodon_lm.data.tokenizer import ByteTokenizer
    from megalodon_lm.training.checkpoint import load_run

    base = SETTINGS["cpu"]
    cfg = {**base, "steps": steps, "warmup": max(1, round(base["warmup"] * steps / base["steps"])),
           "eval_every": steps // 4 if steps % 4 == 0 else steps, "threads": threads}
    split = book_split(books_dir)
    train_books = split["train"][:cfg["train_books"]]
    curve_val = write_slices(split["validation"], cfg["curve_bytes"], out / "data" / "val-curve")
    t0 = time.perf_counter()

    def train(name: str) -> dict[str, Any]:
        preset, overrides = CONFIGS[name]
        opts = train_options({**cfg, "preset": preset, "model": overrides}, "megalodon", lr, steps, out / "runs" / name,
                             train_books, curve_val, out / "token-cache")
        return run_worker(opts, out / "logs" / f"train-{name}.log")

    (out / "logs").mkdir(parents=True, exist_ok=True)
    build_corpora(train_books, ByteTokenizer(), out / "token-cache", val_sources=curve_val, progress=False)  # once
    with ThreadPoolExecutor(len(names) if parallel else 1) as pool:
        trained = dict(zip(names, pool.map(train, names), strict=True))
    final_docs = [read_book(p, cfg["final_bytes"]) for p in split["validation"]]
    res: dict[str, Any] = {"recipe": {k: cfg[k] for k in ("seq_len", "batch_size", "steps", "warmup", "threads")},
                           "lr": lr, "parallel": parallel, "system": system_info(torch.device("cpu"), threads),
                           "configs": {}}
    torch.set_num_threads(threads)
    for name in names:
        run_dir = out / "runs" / name
        model = load_run(run_dir, torch.device("cpu"))[0]
        curve = read_curve(run_dir / "metrics.jsonl")
        r = trained[name]
        res["configs"][name] = {
            "preset": CONFIGS[name][0], "overrides": CONFIGS[name][1], "params": model.num_parameters(),
            "tokens": r["tokens"], "train_time": curve[-1]["train_time"],
            "tokens_per_s": r["tokens"] / curve[-1]["train_time"], "curve": curve,
            "final_bpb": windowed_bpb(model, final_docs, cfg["seq_len"], torch.device("cpu"))["bpb"]}
        print(f"{name}: {res['configs'][name]['final_bpb']:.4f} BPB", flush=True)
    res["total_seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    return res


def markdown(res: dict[str, Any]) -> str:
    """One row per configuration: params, tokens, time, tokens/s, last curve point, BPB of the 64 KiB slices."""
    rc = res["recipe"]
    lines = [f"T = {rc['seq_len']}, batch {rc['batch_size']}, {rc['steps']} steps (warm-up {rc['warmup']}), "
             f"lr {res['lr']:g}, {rc['threads']} thread(s){', trained in parallel' if res['parallel'] else ''}; "
             f"{res['system'].get('cpu_model')}, torch {res['system']['torch']}, {res['system']['date']}.", "",
             "| config | params | tokens | train time | tokens/s | val BPB (curve slices) "
             "| BPB first 64 KiB of each val book, context T |", "|---|---|---|---|---|---|---|"]
    for name, c in res["configs"].items():
        lines.append(f"| {name} | {c['params']:,} | {c['tokens']:,} | {c['train_time']:.0f} s | "
                     f"{c['tokens_per_s']:,.0f} | {c['curve'][-1]['val_bpb']:.4f} | {c['final_bpb']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="3M,mini", help=f"comma-separated, from {', '.join(CONFIGS)} [3M,mini]")
    p.add_argument("--out", type=Path, default=Path("runs") / "presets", help="output directory [runs/presets]")
    p.add_argument("--books", type=Path, default=DEFAULT_BOOKS, help=f"mini-PG19 books directory [{DEFAULT_BOOKS}]")
    p.add_argument("--steps", type=int, default=720, help="training steps of each configuration [720]")
    p.add_argument("--lr", type=float, default=4e-3, help="peak learning rate, the same for all [0.004]")
    p.add_argument("--threads", type=int, default=2, help="torch threads per training process [2]")
    p.add_argument("--parallel", action="store_true", help="train all configurations at once")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names or args.steps < 4 or args.threads < 1:
        print(f"preset_compare: choose --configs from {', '.join(CONFIGS)}, --steps >= 4, --threads >= 1",
              file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"preset_compare: {args.out} is not empty", file=sys.stderr)
        return 2
    try:
        compare(names, args.out, args.books, args.steps, args.lr, args.threads, args.parallel)
    except FileNotFoundError as err:
        print(f"preset_compare: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
