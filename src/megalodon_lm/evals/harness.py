"""`megalodon-lm eval harness MODEL_DIR --tasks ...`: lm-evaluation-harness tasks on a run directory or an
exported transformers folder, printing lm-eval's results table.

Tasks from `--include-path` are looked up first; lm-eval's own task index (thousands of YAML files, about
ten seconds to build) is read only when a requested task is not found there. The model is
`evals/lm_eval_model.py`'s "megalodon" (whole contexts streamed through the state, no truncation).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

EVAL_EXTRA = "pip install 'megalodon-lm[eval]'"


def add_harness_parser(sub) -> argparse.ArgumentParser:
    """Register `harness` on the `eval` subcommand's subparsers object."""
    p = sub.add_parser("harness", help="lm-evaluation-harness tasks (needs the eval extra)",
                       description="Run lm-evaluation-harness tasks on a run directory or an exported transformers "
                                   "folder and print lm-eval's table. Standard tasks download their data sets from "
                                   "the Hugging Face Hub on first use. Defaults in brackets.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="run directory or transformers folder (export-hf)")
    p.add_argument("--tasks", required=True, metavar="LIST", help="comma-separated task names or globs")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="directory of extra task YAML files; repeatable")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="requests per forward [1]")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="N", help="few-shot examples [task default]")
    p.add_argument("--limit", type=float, default=None, metavar="N",
                   help="documents per task (a fraction if < 1) [all]; for quick checks, not reportable numbers")
    p.add_argument("--step", type=int, default=None, metavar="N", help="checkpoint step of a run [latest]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto: cuda when available]")
    p.add_argument("--piece-tokens", type=int, default=2048, metavar="N",
                   help="tokens per forward when streaming a context [2048]")
    p.add_argument("--max-gen-toks", type=int, default=256, metavar="N",
                   help="generated tokens per request unless the task says [256]")
    p.add_argument("--seed", type=int, default=1234, metavar="N", help="seed of lm-eval's sampling [1234]")
    p.add_argument("--out", default=None, metavar="JSON", help="write lm-eval's results as JSON")
    p.set_defaults(func=run_eval_harness)
    return p


def _task_manager(tasks: list[str], include_paths: list[str]):
    from lm_eval.tasks import TaskManager

    if include_paths:
        local = TaskManager(include_path=include_paths, include_defaults=False)
        if len(local.match_tasks(tasks)) == len(tasks):
            return local
    manager = TaskManager(include_path=include_paths or None)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        raise ValueError(f"unknown task(s): {', '.join(missing)} (`lm_eval ls tasks` lists lm-eval's tasks; "
                         "--include-path adds a directory of task YAML files)")
    return manager


def evaluate_harness(args: argparse.Namespace) -> dict[str, Any]:
    """lm-eval's results dict for the parsed arguments (see `add_harness_parser`)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"`eval harness` needs lm-evaluation-harness: {EVAL_EXTRA}")
    import lm_eval

    from ..device import resolve_device
    from .lm_eval_model import MegalodonEvalLM

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks: give at least one task name")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    for path in args.include_path:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--include-path {path}: not a directory")
    # The model first: a wrong path fails before lm-eval's task index is read.
    lm = MegalodonEvalLM(str(args.model_dir), step=args.step, device=str(resolve_device(args.device)),
                         batch_size=args.batch_size,
                         piece_tokens=args.piece_tokens, max_gen_toks=args.max_gen_toks)
    manager = _task_manager(tasks, args.include_path)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit,
                                   task_manager=manager, random_seed=args.seed, numpy_random_seed=args.seed,
                                   torch_random_seed=args.seed, fewshot_random_seed=args.seed, log_samples=False)


def run_eval_harness(args: argparse.Namespace) -> int:
    """Handler of `megalodon-lm eval harness`: lm-eval's table(s) to stdout, optional JSON. Returns 0."""
    results = evaluate_harness(args)
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.out:
        keep = {k: results[k] for k in ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")
                if k in results}
        keep["model_dir"] = str(args.model_dir)
        Path(args.out).write_text(json.dumps(keep, indent=2, default=handle_non_serializable) + "\n")
    return 0
