"""Tokenizers: raw bytes (`ByteTokenizer`) and local Hugging Face `tokenizers` models (`HFTokenizer`).

Both expose the same small interface the data pipeline and the trainer use: `kind`, `vocab_size`, `eos_id`,
`encode`, `decode`, `token_byte_lengths` (for bits-per-byte) and `fingerprint` (for cache keys).

Policy for input that is not valid UTF-8: the byte tokenizer sees a file's raw bytes, so any file works
and round-trips exactly. A BPE (`HFTokenizer`) works on text, so files are decoded as UTF-8 with
errors="replace" first: each invalid byte sequence becomes U+FFFD (3 bytes when re-encoded).

Nothing here touches the network: `HFTokenizer` only loads a local tokenizer.json, and `train_bpe`
trains one locally.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
# Searched in this order for an HF tokenizer's end-of-document token.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
CONFIG_NAME = "tokenizer_config.json"
TOKENIZER_NAME = "tokenizer.json"
CONFIG_FORMAT_VERSION = 1

_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is `<|endoftext|>`."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`, one id per byte."""
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Raw bytes as ids (need not be valid UTF-8)."""
        return list(data)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> list[int]:
        """(vocab_size,) bytes per token: 1 for byte tokens, 0 for EOS."""
        return [1] * 256 + [0]

    def fingerprint(self) -> str:
        """Stable hash of the tokenizer definition."""
        spec = {"type": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


@cache
def _byte_level_decoder_map() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: ByteLevel alphabet character -> the byte it stands for."""
    # Printable latin-1 bytes map to themselves; the rest are shifted to 256+ so every byte is a visible char.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    mapping: dict[str, int] = {chr(b): b for b in keep}
    n = 0
    for b in range(256):
        if b not in mapping.values():
            mapping[chr(256 + n)] = b
            n += 1
    return mapping


def _has_component(node: object, type_name: str) -> bool:
    """Whether a tokenizer.json sub-tree (e.g. the decoder, possibly a Sequence) contains `type_name`."""
    if isinstance(node, dict):
        return node.get("type") == type_name or any(_has_component(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_has_component(v, type_name) for v in node)
    return False


class HFTokenizer:
    """A local Hugging Face `tokenizers.Tokenizer`, encoding without automatic special tokens."""

    kind = "hf"

    def __init__(self, tokenizer: Tokenizer | str | Path) -> None:
        if isinstance(tokenizer, (str, Path)):
            path = Path(tokenizer)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {path}")
            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
                raise ValueError(f"cannot load tokenizer from {path}: {e}") from e
        self._json = tokenizer.to_str()
        # A private copy, so that switching on `encode_special_tokens` does not change the caller's object.
        self._tok = Tokenizer.from_str(self._json)
        # Document text that happens to contain "<|endoftext|>" must stay text, not become a real EOS.
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos()

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        return cls(path)

    @property
    def tokenizer(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (special tokens in input text are encoded as plain text)."""
        return self._tok

    def _find_eos(self) -> int:
        for name in EOS_CANDIDATES:
            idx = self._tok.token_to_id(name)
            if idx is not None:
                return int(idx)
        names = ", ".join(EOS_CANDIDATES)
        raise ValueError(f"tokenizer has no end-of-text token: none of {names} is in its vocabulary")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS or other post-processing."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust library)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_byte_lengths(self) -> list[int]:
        """(vocab_size,) UTF-8 bytes each token stands for; 0 for special tokens.

        Exact for byte-level BPE (each vocabulary character is one byte of the ByteLevel alphabet). For other
        models it is the UTF-8 length of the token string, with SentencePiece's "▁" as a space, "<0xXX>"
        byte-fallback tokens as 1 byte and WordPiece's "##" continuation prefix removed.
        """
        spec = json.loads(self._json)
        byte_level = _has_component(spec.get("decoder"), "ByteLevel")
        word_piece = (spec.get("model") or {}).get("type") == "WordPiece"
        added = self._tok.get_added_tokens_decoder()
        alphabet = _byte_level_decoder_map()
        lengths = [0] * self.vocab_size
        for i in range(self.vocab_size):
            if i in added:
                # Added tokens are matched verbatim in the raw text, so their content is plain text.
                lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
                continue
            token = self._tok.id_to_token(i)
            if token is None:  # a hole in the id space
                continue
            if byte_level:
                lengths[i] = sum(1 if ch in alphabet else len(ch.encode("utf-8")) for ch in token)
            elif _BYTE_FALLBACK.match(token):
                lengths[i] = 1
            else:
                if word_piece and token.startswith("##"):
                    token = token[2:]
                lengths[i] = len(token.replace("▁", " ").encode("utf-8"))
        return lengths

    def fingerprint(self) -> str:
        """sha256 of the tokenizer JSON."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> None:
        """Write the tokenizer.json (the original definition, as loaded)."""
        Path(path).write_text(self._json, encoding="utf-8")

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


AnyTokenizer = ByteTokenizer | HFTokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path, min_frequency: int = 2,
              progress: bool = False) -> HFTokenizer:
    """Train a byte-level BPE locally (GPT-2 style) with `<|endoftext|>` as its only special token.

    The vocabulary holds the special token, all 256 byte symbols, then merges up to `vocab_size` (fewer if the
    text runs out of pairs seen `min_frequency` times: a UserWarning then says so). Saved as a tokenizer.json at
    `out_path`. `progress` shows the tokenizers library's own progress bars (counting, merges).
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE: need at least 258 "
                         "(256 byte tokens + <|endoftext|> + 1 merge)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        # All 256 bytes up front: any input stays encodable even with bytes the training text never had.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() < vocab_size:
        warnings.warn(f"the trained vocabulary has {tok.get_vocab_size()} tokens, fewer than the {vocab_size} asked: "
                      f"the text has no more pairs seen at least {min_frequency} times (give more text or a smaller "
                      "vocab size)", UserWarning, stacklevel=2)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return HFTokenizer(tok)


def save_tokenizer(tok: AnyTokenizer, directory: str | Path) -> None:
    """Write `tokenizer_config.json` (and `tokenizer.json` for an HF tokenizer) into `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, HFTokenizer):
        tok.save(d / TOKENIZER_NAME)
    elif not isinstance(tok, ByteTokenizer):
        raise TypeError(f"cannot save a {type(tok).__name__}: expected ByteTokenizer or HFTokenizer")
    config = {"type": tok.kind, "format_version": CONFIG_FORMAT_VERSION, "vocab_size": tok.vocab_size,
              "eos_id": tok.eos_id}
    if isinstance(tok, HFTokenizer):
        # The same file is transformers' tokenizer_config.json: these two fields make the directory load with
        # AutoTokenizer.from_pretrained as well (our fields are ignored there).
        config.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=tok.tokenizer.id_to_token(tok.eos_id))
    (d / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _load_directory(d: Path) -> AnyTokenizer:
    config_path = d / CONFIG_NAME
    if not config_path.is_file():
        if (d / TOKENIZER_NAME).is_file():  # a plain HF model folder
            return HFTokenizer(d / TOKENIZER_NAME)
        raise FileNotFoundError(f"no {CONFIG_NAME} or {TOKENIZER_NAME} in tokenizer directory: {d}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid {config_path}: {e}") from e
    if "format_version" not in config and (d / TOKENIZER_NAME).is_file():  # transformers' own config file
        return HFTokenizer(d / TOKENIZER_NAME)
    if config.get("format_version") != CONFIG_FORMAT_VERSION:
        raise ValueError(f"{config_path}: unsupported format_version {config.get('format_version')!r}")
    kind = config.get("type")
    if kind == "byte":
        tok: AnyTokenizer = ByteTokenizer()
    elif kind == "hf":
        tok = HFTokenizer(d / TOKENIZER_NAME)
    else:
        raise ValueError(f"{config_path}: unknown tokenizer type {kind!r} (expected 'byte' or 'hf')")
    # A mismatch means tokenizer.json was replaced after saving: refuse rather than train on the wrong ids.
    if (config.get("vocab_size"), config.get("eos_id")) != (tok.vocab_size, tok.eos_id):
        raise ValueError(f"{config_path} says vocab_size={config.get('vocab_size')}, eos_id={config.get('eos_id')} "
                         f"but the tokenizer has vocab_size={tok.vocab_size}, eos_id={tok.eos_id}")
    return tok


def load_tokenizer(spec: str | Path) -> AnyTokenizer:
    """"byte" -> ByteTokenizer; a tokenizer.json path -> HFTokenizer; a `save_tokenizer` directory -> its tokenizer."""
    if isinstance(spec, str) and spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path} (expected 'byte', a tokenizer.json file, "
                                "or a directory written by save_tokenizer)")
    if path.is_dir():
        return _load_directory(path)
    return HFTokenizer(path)
