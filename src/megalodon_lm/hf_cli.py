"""`megalodon-lm export-hf` / `import-hf`. Kept outside `megalodon_lm.hf` so that building the CLI does not
import transformers (slow, and optional: the `hf` extra)."""

from __future__ import annotations

import argparse
from typing import Any


def _convert_module():
    try:
        from .hf import convert
    except ImportError as err:
        raise ValueError(f"this command needs the `hf` extra: pip install 'megalodon-lm[hf]' ({err})") from err
    return convert


def _cmd_export(args: argparse.Namespace) -> int:
    from .outputs import check_output_dir

    check_output_dir(args.out_dir, "OUT_DIR")  # before loading anything: a file there fails in one line
    out = _convert_module().export_hf(args.run_dir, args.out_dir, step=args.step)
    print(f"exported {args.run_dir} -> {out}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    out = _convert_module().import_hf(args.hf_dir, args.run_dir, tokenizer=args.tokenizer)
    print(f"imported {args.hf_dir} -> {out}")
    return 0


def add_hf_parsers(subparsers: Any) -> None:
    """Register `export-hf RUN_DIR OUT_DIR` and `import-hf HF_DIR RUN_DIR` on an `add_subparsers()` object."""
    p = subparsers.add_parser("export-hf", help="export a run directory as a Hugging Face transformers directory",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(func=_cmd_export)
    q = subparsers.add_parser("import-hf", help="make a run directory from a Hugging Face transformers directory",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("hf_dir", metavar="HF_DIR")
    q.add_argument("run_dir", metavar="RUN_DIR")
    q.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer path when HF_DIR has no tokenizer")
    q.set_defaults(func=_cmd_import)
