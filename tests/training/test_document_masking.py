"""--document-masking: windows split at EOS into documents that do not see each other (training only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.data.dataset import build_corpora, sample_batch
from megalodon_lm.data.packing import DocumentMaskedForward, document_cu_seqlens
from megalodon_lm.data.sources import resolve_sources
from megalodon_lm.data.tokenizer import ByteTokenizer

from .conftest import SEQ_LEN, make_text, run_tiny, train_lines

pytestmark = pytest.mark.usefixtures("single_thread")
EOS = 9


def test_document_cu_seqlens():
    x = torch.tensor([[1, 2, EOS, 3, EOS, EOS],  # EOS ends its document; two EOS in a row: a 1-token document
                      [EOS, 4, 5, 6, 7, EOS],  # EOS at a row start and a row end: rows are always cut
                      [1, 2, 3, 4, 5, 6]])
    assert document_cu_seqlens(x, EOS).tolist() == [0, 3, 5, 6, 7, 12, 18]
    assert document_cu_seqlens(x, 100).tolist() == [0, 6, 12, 18]  # no EOS: one document per row
    with pytest.raises(ValueError, match="non-empty"):
        document_cu_seqlens(x[0], EOS)


def test_masked_forward_equals_documents_alone():
    torch.manual_seed(0)
    model = MegalodonLM(MegalodonConfig.from_preset("nano", num_layers=1, chunk_size=4)).double().eval()
    x = torch.tensor([[1, 2, EOS, 3, 4, 5, 6, EOS, 7, 8, 8]])
    with torch.no_grad():
        got = DocumentMaskedForward(model, EOS)(x).logits
        want = torch.cat([model(x[:, :3]).logits, model(x[:, 3:8]).logits, model(x[:, 8:]).logits], dim=1)
    assert float((got - want).norm() / want.norm()) < 1e-12


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory) -> Path:
    """40 files of 5..24 bytes: every 32-token window crosses several documents."""
    root = tmp_path_factory.mktemp("docs")
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(make_text(5 + (7 * i) % 20, seed=i), encoding="ascii")
    return root


def test_document_masking_run(tmp_path, short_docs, cache_dir):
    """The logged first-step loss is the document-masked loss of the initial model on batch 0."""
    out = tmp_path / "run"
    r = run_tiny(short_docs, out, cache_dir, max_steps=2, save_every=2, eval_every=2, document_masking=True,
                 val_data=[str(short_docs / "doc00.txt")])
    assert r.step == 2 and math.isfinite(r.final_train_loss) and math.isfinite(r.val_loss)
    assert json.loads((out / "train_config.json").read_text())["document_masking"] is True

    tok = ByteTokenizer()
    train, _ = build_corpora(resolve_sources([short_docs]), tok, cache_dir,
                             val_sources=[short_docs / "doc00.txt"], progress=False)
    x, y = sample_batch(train, 2, SEQ_LEN, step=0, seed=0)
    assert int((x == tok.eos_id).sum()) >= 2
    torch.manual_seed(0)
    init = MegalodonLM(MegalodonConfig.from_json(out / "model_config.json"))
    with torch.no_grad():
        masked = float(init(x, targets=y, cu_seqlens=document_cu_seqlens(x, tok.eos_id)).loss)
        unmasked = float(init(x, targets=y).loss)
    logged = train_lines(out)[0]["loss"]
    assert logged == pytest.approx(masked, rel=1e-6, abs=1e-6)
    assert abs(logged - unmasked) > 1e-4


def test_cli_flag():
    from megalodon_lm.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--document-masking"]).document_masking is True
    assert parser.parse_args(["train", "--no-document-masking"]).document_masking is False
    assert parser.parse_args(["train"]).document_masking is None  # not given: the TrainConfig default (False)
