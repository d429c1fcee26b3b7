"""Tokenizers: byte and BPE round trips, byte lengths for bits-per-byte, save/load, error messages."""

from __future__ import annotations

import json
import lzma
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from megalodon_lm.data import ByteTokenizer, HFTokenizer, load_tokenizer, save_tokenizer, train_bpe

# Tiny Shakespeare ships with the example run (examples/tinyshakespeare.toml), xz-compressed.
SHAKESPEARE = Path(__file__).resolve().parents[2] / "examples" / "tinyshakespeare.txt.xz"
UNICODE = "héllo wörld — ελληνικά, 中文, emoji 😀🚀\n\ttabs and\r\nCRLF\x00"


def generated_text(n_words: int = 3000, seed: int = 0) -> str:
    """A few KB of English-like text with repeated words, so BPE has merges to learn."""
    words = "the of and to in is that it was for on are with as his they be at one have this from".split()
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    out = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    return train_bpe([generated_text()], vocab_size=300, out_path=out)


# ------------------------------------------------------------------------------------------------ byte
def test_byte_tokenizer_unicode_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == UNICODE
    assert tok.decode(ids + [tok.eos_id]) == UNICODE  # specials dropped


def test_byte_tokenizer_raw_bytes_with_replacement():
    tok = ByteTokenizer()
    data = bytes(range(256)) + b"\xff\xfe caf\xe9"
    ids = tok.encode_bytes(data)
    assert ids == list(data)
    assert tok.decode(ids) == data.decode("utf-8", errors="replace")
    assert "\ufffd" in tok.decode(ids)


def test_byte_tokenizer_facts():
    tok = ByteTokenizer()
    assert (tok.kind, tok.vocab_size, tok.eos_id) == ("byte", 257, 256)
    lengths = tok.token_byte_lengths()
    assert len(lengths) == 257 and lengths[:256] == [1] * 256 and lengths[256] == 0
    assert tok.fingerprint() == ByteTokenizer().fingerprint()
    assert len(tok.fingerprint()) == 64


# ------------------------------------------------------------------------------------------------ BPE
def test_bpe_basic_facts(bpe: HFTokenizer, tmp_path: Path):
    assert bpe.kind == "hf"
    assert 258 <= bpe.vocab_size <= 300
    assert bpe.tokenizer.id_to_token(bpe.eos_id) == "<|endoftext|>"
    lengths = bpe.token_byte_lengths()
    assert len(lengths) == bpe.vocab_size
    assert lengths[bpe.eos_id] == 0
    assert sum(1 for n in lengths if n == 1) == 256  # every byte has its own token
    assert max(lengths) > 1  # merges were learned
    # The same definition gives the same fingerprint.
    bpe.save(tmp_path / "copy.json")
    assert HFTokenizer(tmp_path / "copy.json").fingerprint() == bpe.fingerprint()
    assert bpe.fingerprint() != ByteTokenizer().fingerprint()


@pytest.mark.parametrize("text", ["the cat was in the house, and it was one of them.", UNICODE, "\u00ff\u0100 ÿĀ Ġ"])
def test_bpe_round_trip_and_byte_lengths(bpe: HFTokenizer, text: str):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    lengths = bpe.token_byte_lengths()
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))


def test_bpe_compresses_and_keeps_literal_special_text(bpe: HFTokenizer):
    text = generated_text(600, seed=1)
    assert len(bpe.encode(text)) < 0.7 * len(text.encode())
    # A document containing the EOS string must not produce a real EOS id.
    ids = bpe.encode("a <|endoftext|> b")
    assert bpe.eos_id not in ids
    assert bpe.decode(ids) == "a <|endoftext|> b"


def test_hf_tokenizer_leaves_caller_object_alone(bpe: HFTokenizer):
    original = Tokenizer.from_str(bpe.tokenizer.to_str())
    HFTokenizer(original)
    assert original.encode_special_tokens is False


def test_bpe_on_tinyshakespeare(tmp_path: Path):
    with lzma.open(SHAKESPEARE, "rt", encoding="utf-8") as f:
        text = f.read(100_000)
    tok = train_bpe([text], vocab_size=512, out_path=tmp_path / "tok.json")
    sample = text[50_000:52_000]
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert len(sample) / len(ids) > 2.0
    assert sum(tok.token_byte_lengths()[i] for i in ids) == len(sample.encode())


def test_train_bpe_warns_when_the_vocabulary_is_smaller_than_asked(tmp_path: Path, capsys):
    with pytest.warns(UserWarning, match=r"the trained vocabulary has \d+ tokens, fewer than the 8192 asked"):
        tok = train_bpe(["a small text, a small text."], vocab_size=8192, out_path=tmp_path / "tok.json")
    assert tok.vocab_size < 8192
    from megalodon_lm.cli import main

    data = tmp_path / "small.txt"
    data.write_text("a small text, a small text.\n")
    assert main(["tokenizer", "train", "--data", str(data), "--out", str(tmp_path / "cli.json")]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("megalodon-lm: warning: the trained vocabulary has") and "wrote" in out


def test_train_bpe_rejects_tiny_vocab(tmp_path: Path):
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe(["abc"], vocab_size=257, out_path=tmp_path / "t.json")


def test_hf_eos_lookup_order_and_missing():
    vocab = {"[UNK]": 0, "a": 1, "</s>": 2, "<eos>": 3}
    tok = HFTokenizer(Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    assert tok.eos_id == 2  # "</s>" comes before "<eos>" in the search order
    with pytest.raises(ValueError, match="end-of-text token"):
        HFTokenizer(Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")))


def test_hf_byte_lengths_of_sentencepiece_style_tokens():
    vocab = {"<unk>": 0, "</s>": 1, "▁the": 2, "<0xE2>": 3, "é": 4}
    lengths = HFTokenizer(Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))).token_byte_lengths()
    assert lengths[2] == 4 and lengths[3] == 1 and lengths[4] == 2


# ------------------------------------------------------------------------------------------------ save / load
def test_save_and_load_byte(tmp_path: Path):
    save_tokenizer(ByteTokenizer(), tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config == {"type": "byte", "format_version": 1, "vocab_size": 257, "eos_id": 256}
    assert not (tmp_path / "tok" / "tokenizer.json").exists()
    assert isinstance(load_tokenizer(tmp_path / "tok"), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_save_and_load_hf(bpe: HFTokenizer, tmp_path: Path):
    save_tokenizer(bpe, tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["type"] == "hf" and config["vocab_size"] == bpe.vocab_size and config["eos_id"] == bpe.eos_id
    for spec in (tmp_path / "tok", str(tmp_path / "tok"), tmp_path / "tok" / "tokenizer.json"):
        loaded = load_tokenizer(spec)
        assert isinstance(loaded, HFTokenizer)
        assert loaded.fingerprint() == bpe.fingerprint()
        assert loaded.encode(UNICODE) == bpe.encode(UNICODE)


def test_load_tokenizer_errors(tmp_path: Path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")
    save_tokenizer(ByteTokenizer(), tmp_path / "weird")
    (tmp_path / "weird" / "tokenizer_config.json").write_text(json.dumps({"type": "sp", "format_version": 1}))
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        load_tokenizer(tmp_path / "weird")


def test_load_rejects_config_that_does_not_match(bpe: HFTokenizer, tmp_path: Path):
    save_tokenizer(bpe, tmp_path / "tok")
    path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    with pytest.raises(ValueError, match="vocab_size"):
        load_tokenizer(tmp_path / "tok")


def test_saved_bpe_directory_loads_with_transformers_autotokenizer(tmp_path):
    """The saved tokenizer_config.json doubles as transformers' own, so exports work with AutoTokenizer."""
    transformers = pytest.importorskip("transformers")
    from megalodon_lm.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe

    text = "the quick brown fox jumps over the lazy dog. " * 200
    tok = train_bpe([text], 300, tmp_path / "bpe.json")
    save_tokenizer(tok, tmp_path / "tok")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    sample = "the lazy fox jumps"
    assert auto(sample)["input_ids"] == tok.encode(sample)
    assert auto.eos_token_id == tok.eos_id
    assert load_tokenizer(tmp_path / "tok").vocab_size == tok.vocab_size
