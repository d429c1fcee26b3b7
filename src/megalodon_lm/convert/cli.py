"""`megalodon-lm convert-reference CHECKPOINT_DIR OUT_DIR`: the command-line face of `convert_reference`."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from .._cli_format import HelpFormatter
from .reference import DTYPES


def _cmd_convert_reference(args: argparse.Namespace) -> int:
    from ..models import MegalodonConfig
    from ..training.checkpoint import MODEL_CONFIG_FILE
    from .reference import convert_reference

    # Conversion warnings (ignored config fields, RoPE mismatch) are for the user, not a Python traceback line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = convert_reference(args.checkpoint_dir, args.out_dir, tokenizer=args.tokenizer, dtype=args.dtype)
    for w in caught:
        print(f"megalodon-lm: warning: {w.message}", file=sys.stderr)
    config = MegalodonConfig.from_json(out / MODEL_CONFIG_FILE)
    print(f"converted {args.checkpoint_dir} -> {out}: {config.num_parameters():,} parameters, "
          f"vocab {config.vocab_size}, {args.dtype}")
    return 0


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `convert-reference` on an `ArgumentParser.add_subparsers()` object; returns its parser."""
    p = subparsers.add_parser(
        "convert-reference",
        help="convert a reference Megalodon consolidated checkpoint (MP=1) into a megalodon-lm run directory",
        description="Convert a reference Megalodon checkpoint directory (config.json, consolidate_config.json, "
                    "consolidated.pth; model-parallel size 1) into a run directory that load_run, generation "
                    "and `train --init-from` accept.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="reference consolidated checkpoint directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new run directory to create (must hold no checkpoints)")
    p.add_argument("--tokenizer", default=None,
                   help="'byte' or a tokenizer.json (overrides config.json's tokenizer path; needed when that is "
                        "a SentencePiece .model)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the saved weights")
    p.set_defaults(func=_cmd_convert_reference)
    return p
