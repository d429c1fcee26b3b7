"""convert_reference refusals: missing files, unsupported layouts, mismatches, unsafe pickles."""

from __future__ import annotations

import json

import pytest
import torch

from megalodon_lm.convert import convert_reference

from .test_reference import source_model, tiny_bpe, write_reference


class NotATensor:
    """A custom class: unpickling it would run arbitrary code paths, so weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.payload = "anything"


@pytest.fixture
def src():
    return source_model()


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_reference(tmp_path / "nope", tmp_path / "run", tokenizer="byte")


def test_missing_config_json(tmp_path, src):
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict())
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_reference(ckpt, tmp_path / "run", tokenizer="byte")
    assert not (tmp_path / "run").exists()


def test_config_without_model_section(tmp_path, src):
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict())
    (ckpt / "config.json").write_text(json.dumps({"tokenizer": {"path": "x"}}))
    with pytest.raises(ValueError, match="'model' section"):
        convert_reference(ckpt, tmp_path / "run", tokenizer="byte")


def test_missing_weights(tmp_path, src):
    ckpt = write_reference(tmp_path / "ref", src.config, None)
    with pytest.raises(FileNotFoundError, match="consolidated.pth"):
        convert_reference(ckpt, tmp_path / "run", tokenizer="byte")


def test_model_parallel_shards_are_refused(tmp_path, src):
    ckpt = write_reference(tmp_path / "ref", src.config, None, mp=2)
    for rank in range(2):
        torch.save(src.state_dict(), ckpt / f"consolidated.{rank:02d}.pth")
    with pytest.raises(ValueError, match=r"model_parallel_size=2.*only model-parallel-size-1.*Merge the shards"):
        convert_reference(ckpt, tmp_path / "run", tokenizer="byte")


def test_single_shard_00_is_accepted(tmp_path, src):
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict(), weights_name="consolidated.00.pth")
    convert_reference(ckpt, tmp_path / "run", tokenizer="byte")


def test_shape_mismatch(tmp_path, src):
    sd = dict(src.state_dict())
    sd["layers.1.mega.wz.weight"] = sd["layers.1.mega.wz.weight"][:8]
    ckpt = write_reference(tmp_path / "ref", src.config, sd)
    with pytest.raises(ValueError, match=r"shape mismatches.*layers\.1\.mega\.wz\.weight \(8, 32\) vs \(16, 32\)"):
        convert_reference(ckpt, tmp_path / "run", tokenizer="byte")


def test_missing_and_unexpected_keys(tmp_path, src):
    sd = dict(src.state_dict())
    del sd["layers.0.nffn.fc2.weight"]
    sd["layers.0.nffn.fc3.weight"] = torch.zeros(64, 32)
    ckpt = write_reference(tmp_path / "ref", src.config, sd)
    with pytest.raises(ValueError, match=r"missing keys: layers\.0\.nffn\.fc2\.weight.*unexpected keys: "
                                         r"layers\.0\.nffn\.fc3\.weight"):
        convert_reference(ckpt, tmp_path / "run", tokenizer="byte")


def test_tied_config_with_untied_weights(tmp_path):
    tied = source_model(share_emb=True)
    sd = dict(tied.state_dict())
    sd["output.output.weight"] = torch.randn_like(sd["embed.weight"])
    ckpt = write_reference(tmp_path / "ref", tied.config, sd)
    with pytest.raises(ValueError, match="share_emb"):
        convert_reference(ckpt, tmp_path / "run", tokenizer="byte")


def test_tokenizer_vocab_mismatch(tmp_path, src):
    tiny_bpe(tmp_path / "tokenizer.json")  # 300 ids against the model's 257
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict())
    with pytest.raises(ValueError, match="vocab_size 300 but the model's vocabulary is 257"):
        convert_reference(ckpt, tmp_path / "run", tokenizer=str(tmp_path / "tokenizer.json"))
    assert not (tmp_path / "run").exists()


def test_sentencepiece_model_needs_tokenizer_option(tmp_path, src):
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict())  # tokenizer.path is a .model file
    with pytest.raises(ValueError, match=r"SentencePiece.*--tokenizer PATH/tokenizer\.json"):
        convert_reference(ckpt, tmp_path / "run")


def test_missing_tokenizer_json(tmp_path, src):
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict(), tokenizer_path="/nonexistent/tok.json")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        convert_reference(ckpt, tmp_path / "run")


def test_out_dir_with_checkpoints_is_refused(tmp_path, src):
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict())
    convert_reference(ckpt, tmp_path / "run", tokenizer="byte")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        convert_reference(ckpt, tmp_path / "run", tokenizer="byte")


def test_unknown_dtype(tmp_path, src):
    ckpt = write_reference(tmp_path / "ref", src.config, src.state_dict())
    with pytest.raises(ValueError, match="dtype"):
        convert_reference(ckpt, tmp_path / "run", tokenizer="byte", dtype="float16")


def test_pickled_custom_objects_are_refused(tmp_path, src):
    ckpt = write_reference(tmp_path / "ref", src.config, {"model": src.state_dict(), "extra": NotATensor()})
    with pytest.raises(ValueError, match="refusing to load"):
        convert_reference(ckpt, tmp_path / "run", tokenizer="byte")


def test_corrupt_weights_file(tmp_path, src):
    ckpt = write_reference(tmp_path / "ref", src.config, None)
    (ckpt / "consolidated.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read"):
        convert_reference(ckpt, tmp_path / "run", tokenizer="byte")
