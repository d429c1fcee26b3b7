"""convert_reference round trips: reference-format checkpoints built here convert into runs with identical logits.

The helpers at the top are shared with the other test files of this package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import megalodon_lm
from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.convert import convert_reference
from megalodon_lm.data.tokenizer import HFTokenizer, train_bpe

TINY: dict[str, Any] = {"num_layers": 2, "model_dim": 32, "z_dim": 16, "value_dim": 32, "num_heads": 2,
                        "ffn_hidden_dim": 64, "cema_ndim": 4, "chunk_size": 16, "norm_num_groups": 4,
                        "vocab_size": 257}
SP_PATH = "/nonexistent/llama2/tokenizer.model"


def source_model(seed: int = 0, **overrides: Any) -> MegalodonLM:
    """A tiny model whose zero-initialised tensors (biases, q/k offsets, ...) are randomised too, so that a
    dropped or misplaced tensor changes the logits."""
    torch.manual_seed(seed)
    model = MegalodonLM(MegalodonConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def write_reference(ckpt: Path, config: MegalodonConfig, weights: Any, *, tokenizer_path: str = SP_PATH,
                    model_fields: dict[str, Any] | None = None, mp: int = 1, dtype: str = "fp32",
                    weights_name: str = "consolidated.pth") -> Path:
    """Write a reference consolidated checkpoint directory (docs/architecture.md §9.4) holding `weights`."""
    ckpt.mkdir(parents=True, exist_ok=True)
    model = {**config.to_dict(), **(model_fields or {})}
    ref = {"model": model, "tokenizer": {"path": tokenizer_path, "additional_vocab_size": 0,
                                         "data_tokenized": False}, "model_parallel_size": mp}
    (ckpt / "config.json").write_text(json.dumps(ref))
    (ckpt / "consolidate_config.json").write_text(json.dumps({"model_parallel_size": mp, "dtype": dtype}))
    if weights is not None:
        torch.save(weights, ckpt / weights_name)
    return ckpt


def random_ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: MegalodonLM, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(ids).logits


def bf16_state(model: MegalodonLM) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("wrap", ["bare", "model_key", "module_prefix"])
def test_float32_round_trip_is_exact(tmp_path, wrap):
    src = source_model()
    sd = src.state_dict()
    weights = {"bare": sd, "model_key": {"model": sd, "iteration": 7},
               "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    # vocab_size -1 is the reference default: it must be read off embed.weight.
    ckpt = write_reference(tmp_path / "ref", src.config, weights, model_fields={"vocab_size": -1})
    out = convert_reference(ckpt, tmp_path / "run", tokenizer="byte")

    model, tok = megalodon_lm.load_run(out)
    assert model.config == src.config
    assert tok.kind == "byte"
    ids = random_ids(257)
    assert torch.equal(logits(model, ids), logits(src, ids))


def test_run_directory_contents(tmp_path):
    src = source_model()
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict(), dtype="bf16")
    out = convert_reference(ckpt, tmp_path / "run", tokenizer="byte")
    assert out == tmp_path / "run"
    train_config = json.loads((out / "train_config.json").read_text())
    assert train_config["converted_from"] == str(ckpt.resolve())
    assert train_config["source_format"] == "reference-consolidated"
    assert train_config["source_dtype"] == "bf16"
    assert train_config["reference_config"]["model"]["model_dim"] == 32
    step = out / "checkpoints" / "step_00000000"
    state = json.loads((step / "trainer_state.json").read_text())
    assert state == {"step": 0, "tokens": 0, "elapsed": 0.0, "converted_from": str(ckpt.resolve())}
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000000"
    assert not (step / "optimizer.pt").exists()
    tensors = load_file(str(step / "model.safetensors"))
    assert tensors["layers.0.mega.timenorm.prior_count"].dtype == torch.int64
    assert tensors["embed.weight"].dtype == torch.float32


def test_bf16_checkpoint_matches_rounded_model(tmp_path):
    src = source_model()
    ckpt = write_reference(tmp_path / "ref", src.config, bf16_state(src), dtype="bf16")
    out = convert_reference(ckpt, tmp_path / "run", tokenizer="byte")
    tensors = load_file(str(out / "checkpoints" / "step_00000000" / "model.safetensors"))
    assert tensors["embed.weight"].dtype == torch.float32
    assert tensors["output.final_norm.prior_count"].dtype == torch.int64

    rounded = source_model()
    rounded.load_state_dict(bf16_state(src))  # bf16 values copied into float32 tensors, rope.freqs included
    model, _ = megalodon_lm.load_run(out)
    ids = random_ids(257)
    assert torch.equal(logits(model, ids), logits(rounded, ids))


def test_bfloat16_output_dtype(tmp_path):
    src = source_model()
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict())
    out = convert_reference(ckpt, tmp_path / "run", tokenizer="byte", dtype="bfloat16")
    tensors = load_file(str(out / "checkpoints" / "step_00000000" / "model.safetensors"))
    assert tensors["layers.1.mega.wv.weight"].dtype == torch.bfloat16
    assert tensors["layers.1.mega.timenorm.prior_count"].dtype == torch.int64
    model, _ = megalodon_lm.load_run(out)
    rounded = source_model()
    rounded.load_state_dict(bf16_state(src))
    ids = random_ids(257)
    assert torch.equal(logits(model, ids), logits(rounded, ids))


def test_tied_embeddings_with_redundant_output_weight(tmp_path):
    src = source_model(share_emb=True, scale_emb=True, swiglu=True)
    sd = dict(src.state_dict())
    sd["output.output.weight"] = sd["embed.weight"]  # the reference's tied module carries the matrix twice
    ckpt = write_reference(tmp_path / "ref", src.config, sd)
    out = convert_reference(ckpt, tmp_path / "run", tokenizer="byte")
    model, _ = megalodon_lm.load_run(out)
    assert model.output.output is None
    ids = random_ids(257)
    assert torch.equal(logits(model, ids), logits(src, ids))


def test_missing_rope_freqs_are_rebuilt(tmp_path):
    src = source_model(rope_base=500.0)
    sd = {k: v for k, v in src.state_dict().items() if k != "rope.freqs"}
    ckpt = write_reference(tmp_path / "ref", src.config, sd)
    model, _ = megalodon_lm.load_run(convert_reference(ckpt, tmp_path / "run", tokenizer="byte"))
    assert torch.equal(model.rope.freqs, src.rope.freqs)
    ids = random_ids(257)
    assert torch.equal(logits(model, ids), logits(src, ids))


def test_unknown_reference_fields_warn_and_are_ignored(tmp_path):
    src = source_model(efficient_attn="swift")
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict(),
                           model_fields={"some_future_flag": True})
    with pytest.warns(UserWarning, match="some_future_flag"):
        out = convert_reference(ckpt, tmp_path / "run", tokenizer="byte")
    config = MegalodonConfig.from_json(out / "model_config.json")
    assert config.efficient_attn == "swift"


def test_rope_base_disagreeing_with_stored_freqs_warns(tmp_path):
    src = source_model(rope_base=1e5)
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict(), model_fields={"rope_base": None})
    with pytest.warns(UserWarning, match="rope"):
        out = convert_reference(ckpt, tmp_path / "run", tokenizer="byte")
    model, _ = megalodon_lm.load_run(out)
    assert torch.equal(model.rope.freqs, src.rope.freqs)  # the stored frequencies win


# ---------------------------------------------------------------------- Hugging Face tokenizer
def tiny_bpe(path: Path, vocab_size: int = 300) -> HFTokenizer:
    text = "the quick brown fox jumps over the lazy dog while the owls watch the stars fall. " * 20
    tok = train_bpe([text] * 4, vocab_size=vocab_size, out_path=path)
    assert tok.vocab_size == vocab_size
    return tok


def test_tokenizer_json_from_reference_config(tmp_path):
    tok = tiny_bpe(tmp_path / "tok" / "tokenizer.json")
    src = source_model(vocab_size=300)
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict(),
                           tokenizer_path=str(tmp_path / "tok" / "tokenizer.json"))
    out = convert_reference(ckpt, tmp_path / "run")
    model, loaded = megalodon_lm.load_run(out)
    assert loaded.kind == "hf" and loaded.fingerprint() == tok.fingerprint()
    ids = random_ids(300)
    assert torch.equal(logits(model, ids), logits(src, ids))


def test_tokenizer_option_overrides_sentencepiece_path(tmp_path):
    tok = tiny_bpe(tmp_path / "tokenizer.json")
    src = source_model(vocab_size=300)
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict())  # config names a .model file
    out = convert_reference(ckpt, tmp_path / "run", tokenizer=str(tmp_path / "tokenizer.json"))
    assert megalodon_lm.load_run(out)[1].fingerprint() == tok.fingerprint()
