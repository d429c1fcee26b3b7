"""Exported folders shared by the adapter tests (an export takes a few seconds)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def byte_export(tmp_path_factory):
    """(run_dir, exported folder, library model) of a byte-level run."""
    pytest.importorskip("transformers")
    from megalodon_lm.data.tokenizer import ByteTokenizer
    from megalodon_lm.hf import export_hf

    from .helpers import make_run

    root = tmp_path_factory.mktemp("byte_export")
    model = make_run(root / "run", ByteTokenizer(), 257)
    export_hf(root / "run", root / "hf")
    return root / "run", root / "hf", model


@pytest.fixture(scope="session")
def bpe_export(tmp_path_factory):
    """(run_dir, exported folder, library model, tokenizer) of a BPE run."""
    pytest.importorskip("transformers")
    from megalodon_lm.hf import export_hf

    from .helpers import make_bpe, make_run

    root = tmp_path_factory.mktemp("bpe_export")
    tok = make_bpe(root / "bpe.json")
    model = make_run(root / "run", tok, tok.vocab_size)
    export_hf(root / "run", root / "hf")
    return root / "run", root / "hf", model, tok
