"""Tokenizer files of an exported folder that `AutoTokenizer` loads as a `PreTrainedTokenizerFast`.

A BPE run already has a tokenizer.json. A byte-level run gets one here: a BPE model with no merges over
GPT-2's byte alphabet (one vocabulary character per byte, id = the byte's value) plus `<|endoftext|>` = 256,
so encoding gives exactly `ByteTokenizer`'s ids and decoding gives back the same bytes. Only the
`tokenizers` library is needed (no transformers).

tokenizer_config.json keeps our fields (`load_tokenizer` reads the folder as before) and gains
transformers': the class, EOS = pad, left padding (for batched `generate`; training collators pad by
their own argument), `split_special_tokens` (text "<|endoftext|>" stays text, as in our tokenizers) and no
clean-up of spaces on decode (it would change the bytes).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from ..data.tokenizer import (
    CONFIG_NAME,
    EOS_TOKEN,
    TOKENIZER_NAME,
    AnyTokenizer,
    ByteTokenizer,
    HFTokenizer,
    _byte_level_decoder_map,
)


def byte_level_tokenizer() -> Tokenizer:
    """`ByteTokenizer` as a `tokenizers.Tokenizer`: ids 0..255 are the bytes, 256 is `<|endoftext|>`."""
    vocab = dict(_byte_level_decoder_map())  # ByteLevel alphabet character -> the byte it stands for
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: nothing to merge, so words would only cost time.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    if tok.token_to_id(EOS_TOKEN) != ByteTokenizer.eos_id:
        raise AssertionError("byte-level tokenizer: <|endoftext|> did not get id 256")
    return tok


def write_transformers_tokenizer(tok: AnyTokenizer, directory: str | Path) -> None:
    """Add transformers' tokenizer files to a folder that `save_tokenizer(tok, directory)` wrote."""
    d = Path(directory)
    if isinstance(tok, ByteTokenizer):
        byte_level_tokenizer().save(str(d / TOKENIZER_NAME))
        eos = EOS_TOKEN
    elif isinstance(tok, HFTokenizer):
        eos = tok.tokenizer.id_to_token(tok.eos_id)
    else:
        raise TypeError(f"cannot export a {type(tok).__name__}: expected ByteTokenizer or HFTokenizer")
    path = d / CONFIG_NAME
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=eos, pad_token=eos, padding_side="left",
                  split_special_tokens=True, clean_up_tokenization_spaces=False)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
