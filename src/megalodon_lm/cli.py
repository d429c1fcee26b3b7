"""Command-line interface: `megalodon-lm <command>` (also `python -m megalodon_lm`)."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .models import PRESETS, MegalodonConfig


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    results = run_demo(preset=args.preset, length=args.length, seed=args.seed)
    return 0 if results["exact"] else 1


def _cmd_info(args: argparse.Namespace) -> int:
    cfg = MegalodonConfig.from_json(args.config) if args.config else MegalodonConfig.from_preset(args.preset)
    print(json.dumps({**cfg.to_dict(), "num_parameters": cfg.num_parameters()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megalodon-lm",
        description="Megalodon long-context language models: exact streaming, runs on CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"megalodon-lm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="stream text through a small model and check streaming is exact (default command)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--preset", default="nano", choices=sorted(PRESETS), help="model preset")
    demo.add_argument("--length", type=int, default=1000, help="number of input bytes to stream")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the initialisation")
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser(
        "info", help="print a preset's (or a config file's) fields and parameter count",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    info.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset")
    info.add_argument("--config", default=None, help="a JSON config file instead of a preset")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"megalodon-lm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
