"""Tokenized corpora cached as memory-mapped token files, and the batches drawn from them.

`build_corpora` tokenizes the sources once into `cache_dir/<fingerprint>/` (train.tokens, val.tokens, optional
*.mask, *.docs.npy, meta.json) and later calls with the same inputs only map those files. Documents are joined
with EOS: doc tokens + [eos], the EOS being a training target worth 0 bytes. Prompt/response documents have a
loss mask: 0 on prompt targets, 1 on response targets and on the EOS.

Validation split: `val_sources` if given; otherwise files (or .jsonl lines) chosen by a stable hash, about
`val_fraction` of them; if that selects nothing (e.g. one file), the last 10% of the tokens of the last
training document (the nanoGPT convention for tinyshakespeare).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from .sources import (
    Document,
    default_corpus,
    in_validation,
    is_jsonl,
    is_validation_path,
    iter_documents,
    path_key,
    resolve_sources,
)

FORMAT_VERSION = 1
IGNORE_INDEX = -100
SPLITS = ("train", "val")
# Text buffered before one encode_batch call: big enough for the Rust thread pool, small in memory.
_BATCH_BYTES = 4 << 20
_BATCH_DOCS = 1024


@dataclass
class TokenizedCorpus:
    """One split. tokens: (T,) uint16/uint32; loss_mask: (T,) uint8 or None (all targets); doc_starts: (n_docs,)."""

    tokens: np.ndarray
    loss_mask: np.ndarray | None
    doc_starts: np.ndarray
    n_docs: int
    n_bytes: int

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return self.n_tokens


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


# ---------------------------------------------------------------------------------------------- fingerprint
def _stamp(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def corpus_fingerprint(tokenizer: Any, sources: Sequence[Path], val_sources: Sequence[Path] | None,
                       val_fraction: float) -> str:
    """sha256 over everything the cached tokens depend on; touching any source file changes it."""
    spec = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer.fingerprint(),
        "val_fraction": val_fraction,
        "sources": [_stamp(p) for p in sources],
        "val_sources": None if val_sources is None else [_stamp(p) for p in val_sources],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- encoding
@dataclass
class _Encoded:
    ids: np.ndarray  # (n,) doc tokens followed by EOS
    mask: np.ndarray | None  # (n,) uint8, None = all targets
    n_bytes: int


def _join(prompt: np.ndarray | None, text: np.ndarray, eos: int, dtype: np.dtype, n_bytes: int) -> _Encoded:
    parts = ([] if prompt is None else [prompt]) + [text, np.array([eos])]
    ids = np.concatenate([p.astype(dtype, copy=False) for p in parts])
    mask = None
    if prompt is not None:
        mask = np.ones(len(ids), dtype=np.uint8)
        mask[: len(prompt)] = 0
    return _Encoded(ids, mask, n_bytes)


def _encode_documents(tokenizer: Any, docs: list[Document], dtype: np.dtype) -> list[_Encoded]:
    """Tokens (+ EOS), loss mask and text byte count of each document."""
    eos = tokenizer.eos_id
    if tokenizer.kind == "byte":  # bytes are their own ids: no Python lists for megabytes of text
        return [
            _join(None if d.prompt is None else np.frombuffer(d.prompt, np.uint8), np.frombuffer(d.text, np.uint8),
                  eos, dtype, len(d.text) + len(d.prompt or b""))
            for d in docs
        ]
    texts: list[str] = []
    for d in docs:
        if d.prompt is not None:
            texts.append(d.prompt.decode("utf-8", errors="replace"))
        texts.append(d.text.decode("utf-8", errors="replace"))
    if hasattr(tokenizer, "encode_batch"):
        encoded = tokenizer.encode_batch(texts)
    else:
        encoded = [tokenizer.encode(t) for t in texts]
    out, j = [], 0
    for d in docs:
        prompt = None
        n_bytes = 0
        if d.prompt is not None:
            prompt = np.asarray(encoded[j], dtype=np.int64)
            n_bytes += len(texts[j].encode("utf-8"))
            j += 1
        n_bytes += len(texts[j].encode("utf-8"))  # the replacement-decoded text, as the tokenizer saw it
        out.append(_join(prompt, np.asarray(encoded[j], dtype=np.int64), eos, dtype, n_bytes))
        j += 1
    return out


# ---------------------------------------------------------------------------------------------- writing
class _SplitWriter:
    """Appends documents of one split to `<split>.tokens` (and `<split>.mask` once a document needs one)."""

    def __init__(self, directory: Path, split: str) -> None:
        self.directory, self.split = directory, split
        self.tokens_path = directory / f"{split}.tokens"
        self.mask_path = directory / f"{split}.mask"
        self.tokens_path.touch()
        self._tokens: BinaryIO | None = None
        self._mask: BinaryIO | None = None
        self.has_mask = False
        self.doc_starts: list[int] = []
        self.n_tokens = 0
        self.n_bytes = 0

    def add(self, enc: _Encoded) -> None:
        # Files open in append mode on demand, so a closed writer can take more (see _carve_validation).
        if self._tokens is None:
            self._tokens = open(self.tokens_path, "ab")
        if self._mask is None and (self.has_mask or enc.mask is not None):
            self._mask = open(self.mask_path, "ab")
            if not self.has_mask:
                # First masked document: back-fill ones before it, so plain corpora never pay for a mask file.
                self._mask.write(b"\x01" * self.n_tokens)
                self.has_mask = True
        self.doc_starts.append(self.n_tokens)
        enc.ids.tofile(self._tokens)
        if self._mask is not None:
            (np.ones(len(enc.ids), np.uint8) if enc.mask is None else enc.mask).tofile(self._mask)
        self.n_tokens += len(enc.ids)
        self.n_bytes += enc.n_bytes

    def close(self) -> None:
        for f in (self._tokens, self._mask):
            if f is not None:
                f.close()
        self._tokens = self._mask = None

    def rename_to(self, split: str) -> None:
        """Become the writer of another split (closed writers only)."""
        for attr in ("tokens_path", "mask_path"):
            old: Path = getattr(self, attr)
            new = self.directory / old.name.replace(self.split, split, 1)
            if old.exists():
                old.rename(new)
            setattr(self, attr, new)
        self.split = split


def _carve_validation(train: _SplitWriter, val: _SplitWriter, dtype: np.dtype, byte_lengths: np.ndarray) -> None:
    """Move the last 10% of the last training document (and its EOS) into the empty validation split."""
    start, end = train.doc_starts[-1], train.n_tokens
    n_doc = end - start - 1  # without its EOS
    if n_doc < 2:
        raise ValueError(f"cannot make a validation split: no file was chosen for validation and the last training "
                         f"document has only {n_doc} token(s); pass validation data explicitly")
    k = n_doc - (n_doc * 9) // 10  # integer form of the nanoGPT n - int(0.9 n)
    cut = end - 1 - k
    tokens = np.fromfile(train.tokens_path, dtype=dtype, offset=cut * dtype.itemsize)
    mask = np.fromfile(train.mask_path, dtype=np.uint8, offset=cut) if train.has_mask else None
    moved_bytes = int(byte_lengths[tokens.astype(np.int64)].sum())
    val.add(_Encoded(tokens, mask, moved_bytes))
    # The train part ends mid-document: no EOS, so the model is never taught a fake end of text there.
    os.truncate(train.tokens_path, cut * dtype.itemsize)
    if train.has_mask:
        os.truncate(train.mask_path, cut)
    train.n_tokens = cut
    train.n_bytes -= moved_bytes


def _tokenize_to(directory: Path, tokenizer: Any, train_files: list[Path], val_files: list[Path] | None,
                 val_fraction: float, progress: bool) -> dict[str, Any]:
    """Write both splits into `directory`; returns the meta.json content (without the fingerprint)."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _SplitWriter(directory, s) for s in SPLITS}
    jobs = [(p, "train") for p in train_files] + [(p, "val") for p in (val_files or [])]
    pending: list[tuple[Document, str]] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        encoded = _encode_documents(tokenizer, [d for d, _ in pending], dtype)
        for (_, split), enc in zip(pending, encoded, strict=True):
            writers[split].add(enc)
        pending.clear()
        pending_bytes = 0

    try:
        for path, split in tqdm(jobs, desc="tokenizing", unit="file", disable=not progress):
            # .jsonl files hold many documents: split those one by one, other files as a whole.
            by_line = val_files is None and is_jsonl(path)
            if val_files is None and not by_line:
                split = "val" if is_validation_path(path, val_fraction) else "train"
            key = path_key(path)
            for doc in iter_documents(path):
                if by_line:
                    split = "val" if in_validation(f"{key}:{doc.index}", val_fraction) else "train"
                pending.append((doc, split))
                pending_bytes += len(doc.text) + len(doc.prompt or b"")
                if pending_bytes >= _BATCH_BYTES or len(pending) >= _BATCH_DOCS:
                    flush()
        flush()
    finally:
        for w in writers.values():
            w.close()

    train, val = writers["train"], writers["val"]
    rule = "val_sources" if val_files is not None else "hash"
    if train.n_tokens == 0 and val.n_tokens == 0:
        raise ValueError("data is empty: the sources contain no documents")
    if train.n_tokens == 0:
        if val_files is not None:
            raise ValueError("data is empty: the training sources contain no documents")
        # Every file hashed into validation (e.g. one file that drew the 2%): treat it all as training data.
        train.rename_to("tmp")
        val.rename_to("train")
        train.rename_to("val")
        train, val = val, train
        writers = {"train": train, "val": val}
    if val.n_tokens == 0:
        if val_files is not None:
            raise ValueError("validation data is empty: the validation sources contain no documents")
        _carve_validation(train, val, dtype, np.asarray(tokenizer.token_byte_lengths(), dtype=np.int64))
        val.close()
        rule = "last_10_percent"

    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "dtype": dtype.name, "val_rule": rule,
                            "val_fraction": val_fraction,
                            "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint(),
                                          "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
                            "n_train_files": len(train_files), "n_val_files": len(val_files or [])}
    for split, w in writers.items():
        np.save(directory / f"{split}.docs.npy", np.asarray(w.doc_starts, dtype=np.int64))
        meta[split] = {"n_tokens": w.n_tokens, "n_docs": len(w.doc_starts), "n_bytes": w.n_bytes,
                       "has_mask": w.has_mask}
    return meta


# ---------------------------------------------------------------------------------------------- loading
def _load_split(directory: Path, split: str, meta: dict[str, Any]) -> TokenizedCorpus:
    info = meta[split]
    n = int(info["n_tokens"])
    dtype = np.dtype(meta["dtype"])
    for name, itemsize in ((f"{split}.tokens", dtype.itemsize), (f"{split}.mask", 1)):
        if (directory / name).exists() and (directory / name).stat().st_size != n * itemsize:
            raise ValueError(f"{directory / name} has the wrong size for {n} tokens")
    tokens = np.memmap(directory / f"{split}.tokens", dtype=dtype, mode="r", shape=(n,))
    mask = np.memmap(directory / f"{split}.mask", dtype=np.uint8, mode="r", shape=(n,)) if info["has_mask"] else None
    doc_starts = np.load(directory / f"{split}.docs.npy")
    return TokenizedCorpus(tokens, mask, doc_starts, int(info["n_docs"]), int(info["n_bytes"]))


def _load_cache(directory: Path, fingerprint: str) -> tuple[TokenizedCorpus, TokenizedCorpus]:
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION or meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{directory}/meta.json does not match this corpus")
    return _load_split(directory, "train", meta), _load_split(directory, "val", meta)


def build_corpora(sources: list[Path] | None, tokenizer: Any, cache_dir: str | Path,
                  val_sources: list[Path] | None = None, val_fraction: float = 0.02,
                  progress: bool = True) -> tuple[TokenizedCorpus, TokenizedCorpus]:
    """(train, val) corpora of `sources` (None: the stdlib default corpus), tokenized once and cached.

    `sources` and `val_sources` may also hold directories and globs (see `resolve_sources`). Files listed in
    `val_sources` are left out of training.
    """
    train_files = default_corpus() if sources is None else resolve_sources(sources)
    val_files = None if val_sources is None else resolve_sources(val_sources)
    if val_files is not None:
        held_out = set(val_files)
        train_files = [p for p in train_files if p not in held_out]
        if not train_files:
            raise ValueError("data is empty: every training file is also a validation file")
    fingerprint = corpus_fingerprint(tokenizer, train_files, val_files, val_fraction)
    cache_root = Path(cache_dir)
    final = cache_root / fingerprint
    if (final / "meta.json").exists():
        try:
            return _load_cache(final, fingerprint)
        except (ValueError, OSError, KeyError):
            shutil.rmtree(final, ignore_errors=True)  # damaged by hand or by a full disk: build it again
    # Build in a private temporary folder and rename it into place: readers never see a half-written cache,
    # and two processes building the same corpus at once cannot corrupt each other.
    tmp = cache_root / f".tmp-{fingerprint[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if cache_root.exists() and not cache_root.is_dir():
            raise ValueError(f"the tokenized-data cache {cache_root} is not a directory (--cache-dir)")
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        meta = _tokenize_to(tmp, tokenizer, train_files, val_files, val_fraction, progress)
        meta["fingerprint"] = fingerprint
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: use its identical files
    except OSError as exc:  # read-only or full: one line naming the place and the way out
        shutil.rmtree(tmp, ignore_errors=True)
        culprit = None if exc.filename is None else Path(exc.filename).resolve()
        if culprit is not None and culprit != cache_root.resolve() and cache_root.resolve() not in culprit.parents:
            raise  # a source file that cannot be read: not the cache's fault
        raise ValueError(f"cannot write the tokenized-data cache in {cache_root}: {exc.strerror or exc}; "
                         "pass a writable --cache-dir") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load_cache(final, fingerprint)


# ---------------------------------------------------------------------------------------------- batches
def _check_window(corpus: TokenizedCorpus, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if corpus.n_tokens < seq_len + 1:
        raise ValueError(f"corpus has {corpus.n_tokens} tokens, fewer than one training window of seq_len+1 = "
                         f"{seq_len + 1}; use a shorter seq_len or more data")


def _targets(corpus: TokenizedCorpus, idx: np.ndarray) -> torch.Tensor:
    """int64 tokens at `idx` with IGNORE_INDEX where their loss mask is 0."""
    y = np.array(corpus.tokens[idx], dtype=np.int64)  # a fresh plain array (not a memmap view): writable
    if corpus.loss_mask is not None:
        y[np.asarray(corpus.loss_mask[idx]) == 0] = IGNORE_INDEX
    return torch.from_numpy(y)


def sample_batch(corpus: TokenizedCorpus, batch_size: int, seq_len: int, step: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows, a pure function of (seed, step, rank). Returns x, y: (B, seq_len) int64.

    y[b, t] = tokens[s_b + t + 1], or -100 where that target is masked out (prompt tokens).
    """
    _check_window(corpus, seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    rng = np.random.default_rng([seed, step, rank])
    starts = rng.integers(0, corpus.n_tokens - seq_len - 1, size=batch_size, endpoint=True)
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, seq_len + 1)
    x = torch.from_numpy(np.asarray(corpus.tokens[idx[:, :-1]], dtype=np.int64))
    return x, _targets(corpus, idx[:, 1:])


def eval_windows(corpus: TokenizedCorpus, seq_len: int,
                 max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows from the start: x, y of shape (1, L), L = seq_len except a shorter last one.

    Every target position 1..T-1 appears exactly once (up to `max_tokens` of them).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    total = max(corpus.n_tokens - 1, 0)
    if max_tokens is not None:
        total = min(total, max_tokens)
    for start in range(0, total, seq_len):
        length = min(seq_len, total - start)
        x = torch.from_numpy(np.asarray(corpus.tokens[start : start + length], dtype=np.int64))
        y = _targets(corpus, np.arange(start + 1, start + length + 1))
        yield x[None], y[None]


def _water_fill(budget: int, caps: list[int]) -> list[int]:
    """Split `budget` as evenly as possible over slots of capacity `caps` (a small slot's excess goes to others)."""
    alloc = [0] * len(caps)
    left = budget
    order = sorted(range(len(caps)), key=lambda i: caps[i])
    for k, i in enumerate(order):
        alloc[i] = min(caps[i], left // (len(caps) - k))
        left -= alloc[i]
    return alloc


def document_spans(corpus: TokenizedCorpus) -> list[tuple[int, int]]:
    """(start, end) token range of each document of the split (the whole split when it records none)."""
    starts = [int(s) for s in corpus.doc_starts] or [0]
    ends = starts[1:] + [corpus.n_tokens]
    return [(s, e) for s, e in zip(starts, ends, strict=True) if e > s]


def sample_eval_windows(corpus: TokenizedCorpus, seq_len: int,
                        max_tokens: int | None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Validation windows (x, y) of shape (1, L) and a description of what they score.

    When the split has at most `max_tokens` targets, every target once (`eval_windows`). Otherwise a fixed,
    evenly spread sample of every document: the budget is split evenly over the documents (a short document
    scores all of its targets and leaves the rest to the others); a document's share is cut into windows of
    seq_len targets whose starts are spread evenly from its beginning to its end, within the document.
    Description: {"val_sample": "all" | "spread", "val_targets": scored targets (masked ones included),
    "val_docs": documents with at least one scored target, "val_docs_total": documents in the split}.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    spans = document_spans(corpus)
    total = max(corpus.n_tokens - 1, 0)
    if max_tokens is None or total <= max_tokens:
        windows = list(eval_windows(corpus, seq_len))
        return windows, {"val_sample": "all", "val_targets": total, "val_docs": len(spans) if total else 0,
                         "val_docs_total": len(spans)}
    caps = [e - s - 1 for s, e in spans]  # targets inside a document: x_s predicts x_{s+1}, ..., up to x_{e-1}
    windows = []
    docs = 0
    for (s, _), cap, share in zip(spans, caps, _water_fill(max_tokens, caps), strict=True):
        width = min(seq_len, share)
        n = share // width if width else 0
        if n == 0:
            continue
        docs += 1
        room = cap - width  # starts from s to s + room keep the window inside the document
        for i in range(n):
            p = s + (i * room // (n - 1) if n > 1 else room // 2)
            x = torch.from_numpy(np.asarray(corpus.tokens[p:p + width], dtype=np.int64))
            windows.append((x[None], _targets(corpus, np.arange(p + 1, p + width + 1))[None]))
    return windows, {"val_sample": "spread", "val_targets": sum(int(y.shape[1]) for _, y in windows),
                     "val_docs": docs, "val_docs_total": len(spans)}


def bytes_per_target(y: torch.Tensor, byte_lengths: torch.Tensor) -> torch.Tensor:
    """int64 scalar: text bytes of the targets in `y` that count (not -100). byte_lengths: (V,)."""
    valid = y != IGNORE_INDEX
    lengths = byte_lengths.to(y.device)[y.clamp(min=0)]  # no boolean indexing: no device sync
    return (lengths.long() * valid).sum(dtype=torch.int64)
