"""Command-line interface: `megalodon-lm <command>` (also `python -m megalodon_lm`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from . import __version__
from ._cli_format import HelpFormatter
from .models import PRESETS, MegalodonConfig


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    results = run_demo(preset=args.preset, length=args.length, seed=args.seed)
    return 0 if results["exact"] else 1


TRAIN_HELP = {
    "arch": "megalodon, or llama: HF LlamaForCausalLM (sdpa) matched to the preset's parameter count (+-5%%; "
            "needs the hf extra)",
    "preset": "model preset ({})".format(", ".join(sorted(PRESETS))),
    "config": "a TOML run config (same keys as these options, plus a [model] table); flags win",
    "data": "training text: file, directory (recursive), glob, .jsonl (text or prompt/response), .gz/.xz; "
            "repeatable [the running Python's standard library sources]",
    "val_data": "validation text (repeatable) [a deterministic split of --data]",
    "tokenizer": "'byte' or a tokenizer.json / tokenizer directory",
    "seq_len": "tokens per training sequence",
    "batch_size": "sequences per step per process (global batch = batch x ranks x grad-accum)",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "document_masking": "split each training window at EOS into documents that do not see each other (fresh "
                        "CEMA/norm state, own attention chunks); the target after an EOS stays scored; "
                        "evaluation is unchanged",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "the cosine schedule decays to lr x this",
    "warmup_steps": "linear warm-up steps; more than --max-steps is an error [min(100, max-steps / 10)]",
    "max_steps": "optimizer steps (the schedule's horizon); with --resume, a larger value trains on",
    "max_time": "wall-clock budget of the whole job, final evaluation and sample included: seconds or 90s / 10m / "
                "2h; 'none' for no limit. It counts across resumes: with --resume, a larger value trains on",
    "weight_decay": "AdamW weight decay, on all parameters as in the reference",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "eps": "AdamW epsilon",
    "grad_clip": "gradient-norm clipping threshold; 0 = no clipping",
    "eval_every": "evaluate every N steps",
    "eval_tokens": "validation targets scored per evaluation (all of a smaller split, else an evenly spread "
                   "sample of every validation document; the metrics record what was scored)",
    "save_every": "checkpoint every N steps", "keep_last": "checkpoints kept",
    "log_every": "log a metrics line every N steps",
    "sample_tokens": "tokens of the text sample at the end (0 = none)", "sample_prompt": "prompt of that sample",
    "out": "run directory [a new runs/megalodon-<date>-<time>]",
    "resume": "continue the run in --out [the newest under runs/] from its latest checkpoint; only run-time "
              "options, --max-steps and --max-time may change",
    "init_from": "start a new run from another run directory's weights and architecture (fresh optimizer)",
    "cache_dir": "tokenized-data cache directory [~/.cache/megalodon-lm]",
    "seed": "random seed (initialisation and data order)", "device": "auto, cpu or cuda",
    "dtype": "fp32, or bf16 autocast with fp32 master weights", "compile": "torch.compile the model",
    "threads": "torch CPU threads [the CPUs this process may use: affinity mask, cgroup quota, or "
               "OMP_NUM_THREADS]", "progress": "auto, bar, plain or none",
    "tensorboard": "write TensorBoard logs when tensorboard is installed",
    "parallel": "under torchrun: auto (ddp with several processes), ddp, fsdp (FSDP2, one unit per block) or none",
    "chunk_parallel": "under torchrun: K ranks share each sequence in K contiguous pieces (--seq-len divisible "
                      "by K x chunk_size), handing the CEMA/norm state from rank to rank",
    "activation_checkpointing": "recompute each block in the backward pass (less memory, more compute)",
    "memory_check": "refuse a model whose estimated training memory exceeds the available memory, before "
                    "building it (--no-memory-check: try anyway)",
}


def _add_train_parser(sub) -> None:
    from .training.config import TrainConfig

    p = sub.add_parser("train", help="train a Megalodon model (with no options: a small model on the Python "
                       "standard library's sources, 8 minutes on a CPU)",
                       description="Train a Megalodon language model. Defaults in brackets.")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = TRAIN_HELP[f.name]
        if not text.endswith("]"):  # the default in brackets, where the text does not state it
            shown = repr(default) if isinstance(default, str) and default.strip() != default else default
            text += f" [{shown if default not in ([], None) else '-'}]"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, list):
            p.add_argument(flag, action="append", default=None, metavar="PATH", help=text)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if f.name in ("threads", "warmup_steps"):  # None defaults of int options
                kind = int
            p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--config", default=None, metavar="FILE.toml", help=TRAIN_HELP["config"])
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from .training.trainer import TrainingError, train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    try:
        result = train(args.config, **options)
    except TrainingError as err:
        print(f"megalodon-lm: {err}", file=sys.stderr)
        return 1
    if result.stopped_by == "signal":
        return 128 + (result.signal or 2)  # the shell convention: 130 for SIGINT, 143 for SIGTERM
    return 0


def _cmd_consolidate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .distributed.checkpoint_dcp import consolidate
    from .training.checkpoint import CHECKPOINTS_DIR, latest_checkpoint
    from .training.run_lock import RunLock

    run = Path(args.run_dir)
    ckpt = latest_checkpoint(run) if args.step is None else run / CHECKPOINTS_DIR / f"step_{args.step:08d}"
    if ckpt is None or not ckpt.is_dir():
        raise FileNotFoundError(f"no checkpoint{'' if args.step is None else f' for step {args.step}'} in {run}")
    with RunLock(run):  # a writer: not while a training process may prune this checkpoint
        print(f"wrote {consolidate(ckpt)}")
    return 0


def _add_consolidate_parser(sub) -> None:
    c = sub.add_parser("consolidate", help="gather a distributed run's sharded checkpoint into model.safetensors",
                       formatter_class=HelpFormatter)
    c.add_argument("run_dir", help="run directory")
    c.add_argument("--step", type=int, default=None, help="checkpoint step [the latest]")
    c.set_defaults(func=_cmd_consolidate)


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import warnings

    from tqdm import tqdm

    from .data.sources import iter_documents, resolve_sources
    from .data.tokenizer import train_bpe

    paths = resolve_sources(args.data)
    bar = sys.stderr.isatty()
    files = tqdm(paths, desc="reading", unit="file", disable=not bar)
    texts = (doc.text.decode("utf-8", errors="replace") for p in files for doc in iter_documents(p))
    with warnings.catch_warnings(record=True) as caught:  # a smaller vocabulary: one line, not a traceback line
        warnings.simplefilter("always")
        tok = train_bpe(texts, args.vocab_size, args.out, progress=bar)
    files.close()
    for w in caught:
        print(f"megalodon-lm: warning: {w.message}", file=sys.stderr)
    print(f"wrote {args.out}: vocab {tok.vocab_size}, eos id {tok.eos_id}")
    return 0


def _add_tokenizer_parser(sub) -> None:
    tp = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = tp.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer locally (HF tokenizers)",
                        formatter_class=HelpFormatter)
    t.add_argument("--data", action="append", required=True, metavar="PATH", help="training text (repeatable)")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size including specials")
    t.add_argument("--out", required=True, help="output tokenizer.json")
    t.set_defaults(func=_cmd_tokenizer_train)


def _cmd_info(args: argparse.Namespace) -> int:
    cfg = MegalodonConfig.from_json(args.config) if args.config else MegalodonConfig.from_preset(args.preset)
    print(json.dumps({**cfg.to_dict(), "num_parameters": cfg.num_parameters()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megalodon-lm",
        description="Megalodon long-context language models: exact streaming, runs on CPU.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"megalodon-lm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="stream text through a small model and check that streaming is exact",
        formatter_class=HelpFormatter,
    )
    demo.add_argument("--preset", default="nano", choices=sorted(PRESETS), help="model preset")
    demo.add_argument("--length", type=int, default=1000, help="number of input bytes to stream")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the initialisation")
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser(
        "info", help="print a preset's (or a config file's) fields and parameter count",
        formatter_class=HelpFormatter,
    )
    info.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset")
    info.add_argument("--config", default=None, help="a JSON config file instead of a preset")
    info.set_defaults(func=_cmd_info)
    _add_train_parser(sub)
    _add_tokenizer_parser(sub)
    _add_consolidate_parser(sub)
    from .convert.cli import add_convert_parser
    from .evals.cli import add_eval_parser
    from .generation.cli import add_generate_parser

    add_generate_parser(sub)
    add_eval_parser(sub)
    add_convert_parser(sub)
    from .hf_cli import add_hf_parsers

    add_hf_parsers(sub)
    from .serve.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"megalodon-lm: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only or vanished path: one line, not a traceback
        where = f": {err.filename}" if err.filename else ""
        print(f"megalodon-lm: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training starts, or a second Ctrl-C: nothing half-written is kept
        print("megalodon-lm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
