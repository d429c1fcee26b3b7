"""Token corpora: EOS joining, loss masks, validation splits, the cache, batch sampling, eval windows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megalodon_lm.data import (
    ByteTokenizer,
    TokenizedCorpus,
    build_corpora,
    bytes_per_target,
    eval_windows,
    sample_batch,
    sample_eval_windows,
    train_bpe,
)
from megalodon_lm.data import dataset as dataset_module

BYTE = ByteTokenizer()
EOS = BYTE.eos_id


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def build(tmp_path: Path, sources, tokenizer=BYTE, **kw) -> tuple[TokenizedCorpus, TokenizedCorpus]:
    return build_corpora(sources, tokenizer, tmp_path / "cache", progress=False, **kw)


def plain_corpus(tokens: list[int], mask: list[int] | None = None) -> TokenizedCorpus:
    arr = np.asarray(tokens, dtype=np.uint16)
    m = None if mask is None else np.asarray(mask, dtype=np.uint8)
    return TokenizedCorpus(arr, m, np.zeros(1, np.int64), 1, len(tokens))


class WideTokenizer:
    """A tokenizer with more than 65535 ids (each character becomes id 65536 + its code % 1000)."""

    kind = "wide"
    vocab_size = 70_000
    eos_id = 69_999

    def encode(self, text: str) -> list[int]:
        return [65536 + ord(c) % 1000 for c in text]

    def token_byte_lengths(self) -> list[int]:
        return [1] * (self.vocab_size - 1) + [0]

    def fingerprint(self) -> str:
        return "wide-test-tokenizer"


# ------------------------------------------------------------------------------------------------ building
def test_documents_are_joined_with_eos(tmp_path: Path):
    a = write(tmp_path / "a.txt", "ab")
    b = write(tmp_path / "b.txt", b"c\xffe")  # raw bytes, not valid UTF-8: the byte tokenizer keeps them
    v = write(tmp_path / "v.txt", "xyz")
    train, val = build(tmp_path, [a, b], val_sources=[v])
    assert train.tokens.dtype == np.uint16 and isinstance(train.tokens, np.memmap)
    assert train.tokens.tolist() == [97, 98, EOS, 99, 0xFF, 101, EOS]
    assert train.loss_mask is None
    assert train.doc_starts.tolist() == [0, 3]
    assert (train.n_docs, train.n_bytes, len(train)) == (2, 5, 7)
    assert val.tokens.tolist() == [120, 121, 122, EOS] and (val.n_docs, val.n_bytes) == (1, 3)


def test_prompt_response_loss_mask(tmp_path: Path):
    records = [{"text": "hi"}, {"prompt": "Q:", "response": "A"}, {"text": "z"}]
    src = write(tmp_path / "sft.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    train, _ = build(tmp_path, [src], val_sources=[write(tmp_path / "v.txt", "v")])
    assert train.tokens.tolist() == [104, 105, EOS, 81, 58, 65, EOS, 122, EOS]
    assert train.loss_mask is not None and train.loss_mask.dtype == np.uint8
    assert train.loss_mask.tolist() == [1, 1, 1, 0, 0, 1, 1, 1, 1]
    assert train.n_bytes == 2 + 3 + 1  # prompt bytes are text too
    # Masked targets come out as -100 in y.
    (x, y), = eval_windows(train, seq_len=16)
    assert y[0].tolist() == [105, EOS, -100, -100, 65, EOS, 122, EOS]


def test_single_document_gives_last_ten_percent_to_validation(tmp_path: Path):
    data = bytes(range(200)) * 5  # 1000 bytes, one document
    train, val = build(tmp_path, [write(tmp_path / "one.txt", data)])
    # Train: the first 900 tokens, cut mid-document so no EOS; val: the last 100 and the document's EOS.
    assert train.tokens.tolist() == list(data[:900])
    assert val.tokens.tolist() == list(data[900:]) + [EOS]
    assert (train.n_bytes, val.n_bytes) == (900, 100)
    assert (train.n_docs, val.n_docs) == (1, 1)
    assert val.doc_starts.tolist() == [0]


def test_single_document_split_with_bpe(tmp_path: Path):
    text = "to be or not to be, that is the question. " * 40 + "caf\xe9 \u2014 end\n"
    tok = train_bpe([text], vocab_size=300, out_path=tmp_path / "tok.json")
    src = write(tmp_path / "one.txt", text.encode() + b"\xff")  # invalid byte: U+FFFD for the BPE
    train, val = build(tmp_path, [src], tokenizer=tok)
    assert train.n_bytes + val.n_bytes == len(text.encode()) + 3
    n_doc = len(tok.encode(text + "\ufffd"))
    assert len(val) == n_doc - (n_doc * 9) // 10 + 1 and val.tokens[-1] == tok.eos_id
    lengths = torch.tensor(tok.token_byte_lengths())
    for corpus in (train, val):
        assert bytes_per_target(torch.from_numpy(corpus.tokens.astype(np.int64)), lengths) == corpus.n_bytes
    assert tok.decode(np.concatenate([train.tokens, val.tokens]).tolist()) == text + "\ufffd"


def test_everything_hashed_to_validation_still_trains(tmp_path: Path):
    data = b"0123456789" * 10
    train, val = build_corpora([write(tmp_path / "one.txt", data)], BYTE, tmp_path / "cache", val_fraction=1.0,
                               progress=True)
    assert train.tokens.tolist() == list(data[:90]) and val.tokens.tolist() == list(data[90:]) + [EOS]


def test_prompt_response_mask_with_bpe(tmp_path: Path):
    tok = train_bpe(["question answer " * 50], vocab_size=280, out_path=tmp_path / "tok.json")
    record = {"prompt": "question question ", "response": "answer answer"}
    src = write(tmp_path / "sft.jsonl", json.dumps(record) + "\n" + json.dumps({"text": "answer"}) + "\n")
    train, _ = build(tmp_path, [src], tokenizer=tok, val_sources=[write(tmp_path / "v.txt", "question")])
    prompt, response, plain = (tok.encode(record["prompt"]), tok.encode(record["response"]), tok.encode("answer"))
    eos = [tok.eos_id]
    assert train.tokens.tolist() == prompt + response + eos + plain + eos
    assert train.loss_mask.tolist() == [0] * len(prompt) + [1] * (len(response) + 1 + len(plain) + 1)
    assert train.n_bytes == len(record["prompt"]) + len(record["response"]) + len("answer")


def test_jsonl_documents_are_split_one_by_one(tmp_path: Path):
    src = write(tmp_path / "many.jsonl", "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(200)))
    train, val = build(tmp_path, [src], val_fraction=0.2)
    assert train.n_docs + val.n_docs == 200
    assert 10 <= val.n_docs <= 80
    again_train, again_val = build(tmp_path / "other", [src], val_fraction=0.2)
    assert again_val.tokens.tolist() == val.tokens.tolist()


def test_validation_files_chosen_by_hash(tmp_path: Path):
    # Keys are absolute paths (tmp_path varies): bounds ~4 standard deviations wide.
    files = [write(tmp_path / "d" / f"f{i:03d}.txt", f"file {i}\n") for i in range(200)]
    train, val = build(tmp_path, [tmp_path / "d"], val_fraction=0.1)
    assert train.n_docs + val.n_docs == 200 and 4 <= val.n_docs <= 40
    assert train.n_bytes + val.n_bytes == sum(f.stat().st_size for f in files)


def test_token_dtype_follows_vocab_size(tmp_path: Path):
    src = write(tmp_path / "a.txt", "abcdefghij" * 3)
    train, val = build(tmp_path, [src], tokenizer=WideTokenizer())
    assert train.tokens.dtype == np.uint32
    assert train.tokens[0] == 65536 + ord("a") and val.tokens[-1] == 69_999


# ------------------------------------------------------------------------------------------------ cache
def test_cache_is_reused_then_rebuilt_after_a_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    src = write(tmp_path / "a.txt", "hello world, " * 20)
    train, val = build(tmp_path, [src])
    (entry,) = [p for p in (tmp_path / "cache").iterdir()]  # one folder, no temporary leftovers
    assert len(entry.name) == 64
    assert {"meta.json", "train.tokens", "val.tokens", "train.docs.npy", "val.docs.npy"} <= set(os.listdir(entry))
    stamp = (entry / "train.tokens").stat().st_mtime_ns

    calls = []
    real = dataset_module.iter_documents
    monkeypatch.setattr(dataset_module, "iter_documents", lambda p: calls.append(p) or real(p))
    train2, val2 = build(tmp_path, [src])
    assert calls == []  # loaded from the cache: nothing read or tokenized
    assert train2.tokens.tolist() == train.tokens.tolist() and val2.tokens.tolist() == val.tokens.tolist()
    assert (entry / "train.tokens").stat().st_mtime_ns == stamp

    write(src, "changed text! " * 20)
    train3, _ = build(tmp_path, [src])
    assert calls == [src.resolve()]
    assert BYTE.decode(train3.tokens[:14].tolist()) == "changed text! "
    assert len([p for p in (tmp_path / "cache").iterdir()]) == 2


def test_cache_depends_on_tokenizer_and_val_fraction(tmp_path: Path):
    src = write(tmp_path / "a.txt", "some text " * 10)
    build(tmp_path, [src])
    build(tmp_path, [src], val_fraction=0.5)
    build(tmp_path, [src], tokenizer=WideTokenizer())
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_build_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="data path not found"):
        build(tmp_path, [tmp_path / "missing.txt"])
    only_blank = write(tmp_path / "blank.jsonl", "\n\n")
    with pytest.raises(ValueError, match="data is empty"):
        build(tmp_path, [only_blank])
    with pytest.raises(ValueError, match="last training document has only 1"):
        build(tmp_path, [write(tmp_path / "x.txt", "x")])
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


# ------------------------------------------------------------------------------------------------ batches
def test_sample_batch_shapes_and_targets():
    corpus = plain_corpus(list(range(1000)))
    x, y = sample_batch(corpus, batch_size=4, seq_len=16, step=0, seed=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.int64))  # contiguous windows


def test_sample_batch_is_deterministic_per_step_and_rank():
    corpus = plain_corpus(list(range(5000)))
    x0, _ = sample_batch(corpus, 8, 32, step=3, seed=1)
    assert torch.equal(x0, sample_batch(corpus, 8, 32, step=3, seed=1)[0])
    assert not torch.equal(x0, sample_batch(corpus, 8, 32, step=4, seed=1)[0])
    assert not torch.equal(x0, sample_batch(corpus, 8, 32, step=3, seed=2)[0])
    assert not torch.equal(x0, sample_batch(corpus, 8, 32, step=3, seed=1, rank=1, world_size=2)[0])


def test_sample_batch_reaches_both_ends_and_masks():
    corpus = plain_corpus(list(range(6)), mask=[1, 1, 0, 1, 1, 1])
    starts = {int(sample_batch(corpus, 1, 5, step=s, seed=0)[0][0, 0]) for s in range(40)}
    assert starts == {0}  # exactly one window fits: tokens[0:6]
    _, y = sample_batch(corpus, 2, 5, step=0, seed=0)
    assert y.tolist() == [[1, -100, 3, 4, 5]] * 2
    starts = {int(sample_batch(corpus, 1, 3, step=s, seed=0)[0][0, 0]) for s in range(60)}
    assert starts == {0, 1, 2}


def test_sample_batch_rejects_too_small_corpus():
    corpus = plain_corpus(list(range(10)))
    with pytest.raises(ValueError, match="has 10 tokens, fewer than one training window of seq_len\\+1 = 11"):
        sample_batch(corpus, 1, 10, step=0, seed=0)
    with pytest.raises(ValueError, match="rank"):
        sample_batch(corpus, 1, 4, step=0, seed=0, rank=2, world_size=2)


def test_eval_windows_cover_every_target_once():
    tokens = list(range(23))
    corpus = plain_corpus(tokens, mask=[1] * 10 + [0] + [1] * 12)
    windows = list(eval_windows(corpus, seq_len=5))
    assert [tuple(x.shape) for x, _ in windows] == [(1, 5)] * 4 + [(1, 2)]
    assert torch.cat([x[0] for x, _ in windows]).tolist() == tokens[:-1]
    expected = [-100 if t == 10 else t for t in tokens[1:]]
    assert torch.cat([y[0] for _, y in windows]).tolist() == expected
    capped = list(eval_windows(corpus, seq_len=5, max_tokens=7))
    assert [y.shape[1] for _, y in capped] == [5, 2]
    assert list(eval_windows(plain_corpus([1]), seq_len=5)) == []


def test_bytes_per_target():
    lengths = torch.tensor([1, 2, 3, 0])
    y = torch.tensor([[0, 1, -100], [2, 3, 2]])
    n = bytes_per_target(y, lengths)
    assert n.dtype == torch.int64 and n.ndim == 0 and int(n) == 1 + 2 + 3 + 0 + 3
    assert int(bytes_per_target(torch.full((2, 2), -100), lengths)) == 0


def test_sample_eval_windows_spread_over_every_document():
    # three documents of 40, 9 and 60 tokens; a 40-target budget: the short one is scored whole (8 targets),
    # the other two share the rest (16 each), in windows of 8 spread from each document's start to its end
    lengths = [40, 9, 60]
    tokens = list(range(sum(lengths)))
    starts = np.cumsum([0, *lengths[:-1]])
    corpus = TokenizedCorpus(np.asarray(tokens, dtype=np.uint16), None, starts.astype(np.int64), 3, len(tokens))
    windows, info = sample_eval_windows(corpus, seq_len=8, max_tokens=40)
    assert info == {"val_sample": "spread", "val_targets": 40, "val_docs": 3, "val_docs_total": 3}
    firsts = [int(x[0, 0]) for x, _ in windows]
    assert firsts == [0, 31, 40, 49, 100]  # doc 0: start and end; doc 1: whole; doc 2: start and end
    for x, y in windows:
        assert y[0].tolist() == [t + 1 for t in x[0].tolist()]  # y is x shifted by one
        doc = int(np.searchsorted(starts, int(x[0, 0]), side="right")) - 1
        assert int(y[0, -1]) < starts[doc] + lengths[doc]  # never crosses into the next document
    # a budget that covers the split scores every target once, as eval_windows does
    every, info = sample_eval_windows(corpus, seq_len=8, max_tokens=10_000)
    assert info["val_sample"] == "all" and info["val_targets"] == len(tokens) - 1
    assert torch.cat([x[0] for x, _ in every]).tolist() == tokens[:-1]
    with pytest.raises(ValueError):
        sample_eval_windows(corpus, seq_len=0, max_tokens=4)
