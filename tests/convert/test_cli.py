"""The `convert-reference` subcommand, registered on a stand-alone parser (cli.py wires it in separately)."""

from __future__ import annotations

import argparse

import megalodon_lm
from megalodon_lm.convert.cli import add_convert_parser

from .test_reference import source_model, write_reference


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megalodon-lm")
    add_convert_parser(p.add_subparsers(dest="command"))
    return p


def test_convert_reference_command(tmp_path, capsys):
    src = source_model()
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict(), model_fields={"old_flag": 1})
    args = parser().parse_args(["convert-reference", str(ckpt), str(tmp_path / "run"), "--tokenizer", "byte",
                                "--dtype", "bfloat16"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    assert f"{src.config.num_parameters():,} parameters" in lines[0]
    assert "vocab 257" in lines[0] and str(tmp_path / "run") in lines[0]
    assert "warning" in captured.err and "old_flag" in captured.err
    model, _ = megalodon_lm.load_run(tmp_path / "run")
    assert model.config == src.config


def test_defaults():
    args = parser().parse_args(["convert-reference", "a", "b"])
    assert (args.tokenizer, args.dtype) == (None, "float32")
