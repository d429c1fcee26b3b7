"""What a user of a fresh clone meets: no machine paths, a runnable example, the API in help(), CLI help texts."""

from __future__ import annotations

import hashlib
import lzma
import pydoc
import re
from pathlib import Path

import pytest

import megalodon_lm
from megalodon_lm.cli import main
from megalodon_lm.training.config import load_toml, resolve_config

REPO = Path(__file__).resolve().parents[1]
# ../shared (our private notes and data) and this machine's paths exist only here, never on a user's clone.
MACHINE_PATH = re.compile(r"\.\./shared|/work/")


def _user_facing_files() -> list[Path]:
    files = [REPO / "README.md"]
    for folder in ("src", "docs", "examples"):
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md", ".toml", ".txt")]
    return files


def test_no_machine_paths_in_user_facing_files():
    hits = [f"{p.relative_to(REPO)}:{n}" for p in _user_facing_files()
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if MACHINE_PATH.search(line)]
    assert hits == []


def test_docs_cited_by_the_code_exist():
    """Every `docs/NAME.md` that src/, docs/ or README cite is in the repository."""
    cited = {m for p in _user_facing_files() for m in re.findall(r"docs/([\w-]+\.md)", p.read_text(encoding="utf-8"))}
    assert cited and sorted(c for c in cited if not (REPO / "docs" / c).is_file()) == []


def test_tinyshakespeare_example_runs_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = resolve_config({}, REPO / "examples" / "tinyshakespeare.toml")
    assert cfg.preset == "mini" and cfg.data == ["examples/tinyshakespeare.txt.xz"]
    with lzma.open(REPO / cfg.data[0], "rb") as f:
        text = f.read()
    assert hashlib.sha256(text).hexdigest() == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert set(load_toml(REPO / "examples" / "tinyshakespeare.toml")) <= set(cfg.to_dict())


def test_help_shows_the_public_api():
    text = pydoc.render_doc(megalodon_lm, renderer=pydoc.plaintext)
    for name in ("train(", "load_run(", "generate(", "stream_generate(", "class MegalodonLM", "class TrainConfig"):
        assert name in text, name
    assert (Path(megalodon_lm.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("argv", [[], ["train"], ["export-hf"], ["import-hf"], ["consolidate"], ["eval", "ppl"],
                                  ["eval", "harness"], ["generate"], ["tokenizer", "train"], ["info"],
                                  ["convert-reference"]])
def test_cli_help_texts(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and "[ ]" not in text and "default command" not in text
    if argv == ["train"]:
        assert "prompt of that sample ['\\n']" in text and "[min(100, max-steps / 10)]" in text
    if argv in (["export-hf"], ["import-hf"]):
        assert "RUN_DIR a run directory" in text or "RUN_DIR new run directory" in text
    if argv in (["eval", "ppl"], ["eval", "harness"]):
        assert "[auto: cuda when available]" in text


def test_bare_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_written_files_have_the_ordinary_mode(tmp_path):
    """safetensors writes owner-only files; ours get 0666 minus the umask, like every other file we write."""
    import os

    import torch

    from megalodon_lm import MegalodonConfig, MegalodonLM, save_state
    from megalodon_lm.training.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        model = MegalodonLM(MegalodonConfig.from_preset("nano"))
        ckpt = save_checkpoint(tmp_path / "run", 1, model, None, {"x": 1}, {"step": 1})
        out = model(torch.zeros(1, 3, dtype=torch.long), return_state=True)
        state = save_state(out.state, tmp_path / "state.safetensors", model)
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        modes = {p.name: p.stat().st_mode & 0o777 for p in [*ckpt.iterdir(), state, plain]}
    finally:
        os.umask(old)
    assert set(modes.values()) == {0o644}, modes
