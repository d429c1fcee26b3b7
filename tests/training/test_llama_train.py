"""`--arch llama`: the same trainer trains the matched HF Llama, records the arch, resumes exactly, evaluates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import megalodon_lm
from megalodon_lm.evals.ppl import bpb_vs_context
from megalodon_lm.models.llama_baseline import LlamaLM
from megalodon_lm.training.checkpoint import load_run

from .conftest import assert_same_weights, eval_lines, latest_weights, run_tiny, train_lines

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")


def test_llama_run_records_arch_resumes_exactly_and_evaluates(text_file, cache_dir, tmp_path):
    straight = run_tiny(text_file, tmp_path / "straight", cache_dir, arch="llama", max_steps=6, save_every=3,
                        sample_tokens=8)
    assert straight.step == 6 and straight.val_bpb is not None and straight.val_bpb > 0
    run = tmp_path / "straight"
    assert json.loads((run / "train_config.json").read_text())["arch"] == "llama"
    assert json.loads((run / "llama_config.json").read_text())["model_type"] == "llama"
    assert (run / "sample.txt").is_file()

    # The same run resumed from its step-3 checkpoint: bitwise the same weights, losses and final BPB.
    half = tmp_path / "half"
    shutil.copytree(run, half)
    shutil.rmtree(half / "checkpoints" / "step_00000006")
    (half / "checkpoints" / "latest").write_text("step_00000003\n")
    resumed = megalodon_lm.train(None, out=str(half), resume=True, progress="none", sample_tokens=0)
    assert resumed.step == 6
    assert_same_weights(latest_weights(run), latest_weights(half))
    assert [r["loss"] for r in train_lines(run)] == [r["loss"] for r in train_lines(half)]
    assert eval_lines(run)[-1]["val_bpb"] == eval_lines(half)[-1]["val_bpb"]

    model, tok = load_run(run)
    assert isinstance(model, LlamaLM)
    doc = text_file.read_bytes()[:300]
    res = bpb_vs_context(model, tok, [doc], [16, 64, 1000], score_tokens=40)
    bpbs = [r["bpb"] for r in res["results"]]
    assert all(b == b and b > 0 for b in bpbs)
    assert len({r["n_bytes"] for r in res["results"]}) == 1
    # context >= the document: one forward over the whole prefix, equal to the plain model's scores
    ids = torch.tensor(list(doc))
    with torch.no_grad():
        logits = model(ids[None, :-1]).logits[0, -40:]
    nll = torch.nn.functional.cross_entropy(logits.double(), ids[-40:], reduction="sum")
    assert abs(float(nll) - res["results"][2]["nll_sum"]) / float(nll) < 1e-6


def test_arch_mismatch_on_init_from_is_a_value_error(text_file, cache_dir, tmp_path):
    run_tiny(text_file, tmp_path / "mega", cache_dir, max_steps=2, warmup_steps=1, save_every=2, eval_every=2)
    with pytest.raises(ValueError, match="differs from the architecture"):
        run_tiny(text_file, tmp_path / "ft", cache_dir, arch="llama", init_from=str(tmp_path / "mega"),
                 max_steps=2, warmup_steps=1)
    assert not (tmp_path / "ft").exists()  # checked before anything is written
    with pytest.raises(ValueError, match="--arch"):
        run_tiny(text_file, tmp_path / "bad", cache_dir, arch="gpt")


def test_refresh_is_megalodon_only():
    from megalodon_lm.data.tokenizer import ByteTokenizer
    from megalodon_lm.models import MegalodonConfig
    from megalodon_lm.models.llama_baseline import llama_config_for

    model = LlamaLM(llama_config_for(MegalodonConfig.from_preset("nano"), 64))
    with pytest.raises(ValueError, match="Megalodon models only"):
        bpb_vs_context(model, ByteTokenizer(), [b"some text here"], [None], score_tokens=4, refresh=True)
