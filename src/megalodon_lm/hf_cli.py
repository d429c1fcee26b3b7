"""`megalodon-lm export-hf` / `import-hf`. Kept outside `megalodon_lm.hf` so that building the CLI does not
import transformers (slow, and optional: the `hf` extra)."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from ._cli_format import HelpFormatter


def _convert_module():
    if importlib.util.find_spec("transformers") is None:
        raise ValueError("this command needs the `hf` extra: pip install 'megalodon-lm[hf]'")
    from .hf import convert

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
                              formatter_class=HelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `megalodon-lm train`")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory for the transformers model (config.json, "
                   "model.safetensors and the tokenizer files)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step [the latest]")
    p.set_defaults(func=_cmd_export)
    q = subparsers.add_parser("import-hf", help="make a run directory from a Hugging Face transformers directory",
                              formatter_class=HelpFormatter)
    q.add_argument("hf_dir", metavar="HF_DIR", help="a transformers directory written by `export-hf`")
    q.add_argument("run_dir", metavar="RUN_DIR", help="new run directory to create")
    q.add_argument("--tokenizer", default=None,
                   help="'byte' or a tokenizer path, needed when HF_DIR has no tokenizer [HF_DIR's]")
    q.set_defaults(func=_cmd_import)
