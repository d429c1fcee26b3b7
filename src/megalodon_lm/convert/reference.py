"""Convert a reference consolidated checkpoint (docs/architecture.md §9.4) into a megalodon-lm run directory.

Input (model-parallel size 1 only)::

    CHECKPOINT_DIR/
      config.json                {"model": {ModelConf fields}, "tokenizer": {"path": ..., ...}, ...}
      consolidate_config.json    {"model_parallel_size": 1, "dtype": "bf16"}   (optional)
      consolidated.pth           the world-size-1 state dict (a lone consolidated.00.pth is accepted too)

Parameter and buffer names are the reference's (§1.7), so the state dict loads strictly into `MegalodonLM` once
its config is known. Output: a run directory (see `megalodon_lm.training.checkpoint`) with a step-0 checkpoint,
usable by `megalodon_lm.load_run` and by `megalodon-lm train --init-from`.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import warnings
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from ..data.tokenizer import AnyTokenizer, load_tokenizer, save_tokenizer
from ..models import MegalodonConfig, MegalodonLM
from ..ops.rope import rope_inverse_frequencies
from ..training.checkpoint import TOKENIZER_DIR, init_run_dir, latest_checkpoint, save_checkpoint

SOURCE_FORMAT = "reference-consolidated"
CONFIG_FILE = "config.json"
CONSOLIDATE_CONFIG_FILE = "consolidate_config.json"
WEIGHTS_FILE = "consolidated.pth"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROPE_KEY = "rope.freqs"
TIED_OUTPUT_KEY = "output.output.weight"
MAX_LISTED = 5  # problems named per category in a mismatch error

_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
_PREFIXES = ("module.", "model.")


# ---------------------------------------------------------------------- input layout
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _mp_error(ckpt_dir: Path, mp: int, shards: list[Path]) -> ValueError:
    found = ", ".join(p.name for p in shards[:3]) + (", ..." if len(shards) > 3 else "")
    return ValueError(
        f"{ckpt_dir} is a model-parallel checkpoint (model_parallel_size={mp}"
        + (f"; shards {found}" if shards else "")
        + "): only model-parallel-size-1 consolidated checkpoints (one consolidated.pth) are supported. "
        "Merge the shards into a single world-size-1 state dict (concatenate each model-parallel weight along "
        "its split dimension) saved as consolidated.pth, set model_parallel_size to 1 in "
        f"{CONSOLIDATE_CONFIG_FILE}, and convert that directory."
    )


def locate_weights(ckpt_dir: Path, config: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """(weights file, consolidate_config.json contents or {}) of a reference checkpoint directory.

    Raises ValueError for model-parallel shards and FileNotFoundError when no consolidated weights exist.
    """
    cc_path = ckpt_dir / CONSOLIDATE_CONFIG_FILE
    consolidate = _read_json(cc_path) if cc_path.is_file() else {}
    shards = sorted((p for p in ckpt_dir.iterdir() if _SHARD_RE.fullmatch(p.name)), key=lambda p: p.name)
    mp = consolidate.get("model_parallel_size", 1)
    if not isinstance(mp, int) or isinstance(mp, bool) or mp < 1:
        raise ValueError(f"{cc_path}: model_parallel_size must be a positive int, got {mp!r}")
    if mp > 1 or len(shards) > 1:
        raise _mp_error(ckpt_dir, max(mp, len(shards)), shards)

    single = ckpt_dir / WEIGHTS_FILE
    if single.is_file():
        return single, consolidate
    # Some tools name the only shard of an MP=1 consolidation consolidated.00.pth (the Llama convention).
    if len(shards) == 1 and int(_SHARD_RE.fullmatch(shards[0].name).group(1)) == 0:
        return shards[0], consolidate

    # Without consolidated weights, a config.json saying MP>1 marks a raw (per-rank FSDP) training checkpoint.
    raw_mp = config.get("model_parallel_size")
    others = sorted(p.name for p in ckpt_dir.iterdir() if p.suffix in (".pth", ".pt", ".distcp", ".bin"))
    hint = ""
    if others or (isinstance(raw_mp, int) and raw_mp > 1):
        hint = (f" (found {', '.join(others[:3]) or 'no weight files'}: this looks like a raw training checkpoint; "
                "only consolidated checkpoints can be converted, consolidate it to model_parallel_size 1 first)")
    raise FileNotFoundError(f"no consolidated weights ({WEIGHTS_FILE}) in {ckpt_dir}{hint}")


# ---------------------------------------------------------------------- weights
def _unpickler_detail(exc: Exception) -> str:
    """The informative line of torch's long weights_only error (which starts with generic advice)."""
    text = str(exc)
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if rest:
                return rest.split(". Please use")[0]
    # "WeightsUnpickler error:" may end its line, with the detail on a later one.
    tail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    return tail[0] if tail else text


def load_reference_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`, loaded without executing pickled code, with a common wrapper prefix removed.

    Accepts a bare state dict or a dict whose `model` entry is one; strips `module.` / `model.` when every
    key carries it (DDP/FSDP wrappers).
    """
    try:
        # weights_only: a checkpoint is untrusted input; refuse anything beyond tensors and plain containers.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(exc)
        if "Unsupported global" not in detail:  # not a refused class: a corrupt or non-PyTorch file
            raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {detail}") from exc
        raise ValueError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain containers, which "
            f"torch.load(weights_only=True) does not unpickle (a consolidated checkpoint should be a plain state "
            f"dict). Details: {detail}"
        ) from exc
    except (RuntimeError, OSError, EOFError) as exc:
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {exc}") from exc

    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        if isinstance(obj.get("model"), dict):
            obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds no state dict (expected a dict of tensors, or one under a 'model' key)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state dict entries that are not tensors: {', '.join(bad[:MAX_LISTED])}")

    state = dict(obj)
    stripped = True
    while stripped:  # e.g. "module.model.embed.weight"
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


# ---------------------------------------------------------------------- config
def reference_model_config(model_section: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> MegalodonConfig:
    """Our config from the reference `ModelConf` section; unknown fields are dropped with a warning.

    vocab_size -1 (or absent: the reference default is -1, "fill from the tokenizer") is read off embed.weight.
    """
    known = {f.name for f in dataclasses.fields(MegalodonConfig)}
    unknown = sorted(set(model_section) - known)
    if unknown:
        warnings.warn(f"ignoring reference model field(s) that megalodon-lm does not have: {', '.join(unknown)}",
                      UserWarning, stacklevel=3)
    values = {k: v for k, v in model_section.items() if k in known}
    if values.get("vocab_size", -1) in (-1, None):
        embed = state_dict.get("embed.weight")
        if embed is None or embed.dim() != 2:
            raise ValueError("config.json has vocab_size -1 and the checkpoint has no 2-D embed.weight to read it from")
        values["vocab_size"] = int(embed.shape[0])
    try:
        return MegalodonConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the model section of {CONFIG_FILE} is not a valid Megalodon config: {exc}") from exc


def _listing(kind: str, items: list[str]) -> str:
    more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return f"{kind}: {', '.join(items[:MAX_LISTED])}{more}"


def match_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], config: MegalodonConfig,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Check `state` against the model's `expected` (meta) state dict and cast it; ValueError on any mismatch.

    Floating tensors become `dtype`, others (prior_count) the model's dtype. A missing rope.freqs is rebuilt
    from the config; a present one is kept, as the reference computes with the stored (possibly bf16-rounded)
    values. With share_emb a redundant output.output.weight must equal embed.weight and is dropped.
    """
    state = dict(state)
    if config.share_emb and TIED_OUTPUT_KEY in state:
        tied, embed = state.pop(TIED_OUTPUT_KEY), state.get("embed.weight")
        if embed is not None and (tied.shape != embed.shape or not torch.equal(tied, embed)):
            raise ValueError(f"config says share_emb=True but the checkpoint's {TIED_OUTPUT_KEY} differs from "
                             "embed.weight: the checkpoint was trained without tied embeddings (set share_emb false)")
    if ROPE_KEY not in state:
        state[ROPE_KEY] = rope_inverse_frequencies(config.head_dim, config.effective_rope_base)

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    complex_ = [k for k, v in state.items() if v.is_complex()]
    problems = [_listing(kind, items) for kind, items in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("shape mismatches (checkpoint vs config)", shapes), ("complex tensors", complex_)) if items]
    if problems:
        raise ValueError("the checkpoint does not match its config.json model section: " + "; ".join(problems))

    rebuilt = rope_inverse_frequencies(config.head_dim, config.effective_rope_base)
    # bf16 rounding of the stored freqs is ~0.4% relative; more than that means a different rope_base.
    if not torch.allclose(state[ROPE_KEY].float(), rebuilt, rtol=1e-2, atol=0.0):
        warnings.warn(f"the checkpoint's {ROPE_KEY} do not match rope_base={config.rope_base} of config.json; "
                      "the stored frequencies are used (the config's rope_base is probably wrong)",
                      UserWarning, stacklevel=3)

    out = {}
    for key, ref in expected.items():
        t = state.pop(key)  # popping lets the source tensors go as we convert (peak memory)
        target = dtype if ref.dtype.is_floating_point else ref.dtype
        out[key] = t.to(target).contiguous()
    return out


# ---------------------------------------------------------------------- tokenizer
def _sentencepiece_error(path: Path) -> ValueError:
    sibling = path.with_name("tokenizer.json")
    hint = f" (there is one next to it: {sibling})" if sibling.is_file() else ""
    return ValueError(
        f"the reference tokenizer {path} is a SentencePiece model, which megalodon-lm cannot read (it uses the "
        "Hugging Face tokenizers library, not the sentencepiece package). Pass --tokenizer PATH/tokenizer.json "
        f"with the equivalent Hugging Face tokenizer{hint}, or convert the .model file to a tokenizer.json first "
        "(e.g. transformers' LlamaTokenizerFast(vocab_file=...).save_pretrained(DIR))."
    )


def _is_sentencepiece(spec: str | Path) -> bool:
    return Path(spec).suffix == ".model"


def resolve_tokenizer(spec: str | None, tokenizer_section: dict[str, Any], ckpt_dir: Path) -> tuple[AnyTokenizer, str]:
    """(tokenizer, description): `spec` ("byte" or a tokenizer.json path/dir) wins over config.json's path."""
    if spec is not None:
        if spec != "byte" and _is_sentencepiece(spec):
            raise _sentencepiece_error(Path(spec))
        return load_tokenizer(spec), spec
    raw = tokenizer_section.get("path") if isinstance(tokenizer_section, dict) else None
    if not raw:
        raise ValueError(f"{CONFIG_FILE} names no tokenizer (tokenizer.path): pass --tokenizer "
                         "'byte' or a tokenizer.json")
    path = Path(raw).expanduser()
    if not path.is_absolute() and (ckpt_dir / path).exists():  # relative: next to the checkpoint, else the cwd
        path = ckpt_dir / path
    if _is_sentencepiece(path):
        raise _sentencepiece_error(path)
    if not path.exists():
        raise FileNotFoundError(f"the tokenizer named in {CONFIG_FILE} does not exist here: {raw}; pass --tokenizer "
                                "with its tokenizer.json")
    return load_tokenizer(path), str(path)


# ---------------------------------------------------------------------- conversion
def _build_model(config: MegalodonConfig, state: dict[str, torch.Tensor], dtype: torch.dtype) -> MegalodonLM:
    # Built on the meta device and filled by assignment: no initialisation work or memory for weights that are
    # overwritten anyway (minutes and tens of GB for a 7B model).
    with torch.device("meta"):
        model = MegalodonLM(config)
    tensors = match_state_dict(state, model.state_dict(), config, dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:  # a tensor the state dict does not cover (should be impossible after the strict load)
        raise RuntimeError(f"converted model still has uninitialised tensors: {', '.join(left[:MAX_LISTED])}")
    return model.eval()


def convert_reference(checkpoint_dir: str | Path, out_dir: str | Path, tokenizer: str | None = None,
                      dtype: str = "float32") -> Path:
    """Convert a reference MP=1 consolidated checkpoint into a megalodon-lm run directory; returns `out_dir`.

    tokenizer: "byte" or a tokenizer.json path (or tokenizer directory), overriding config.json's tokenizer path.
    dtype: "float32" or "bfloat16", the dtype of the saved floating tensors.
    Raises FileNotFoundError for missing inputs and ValueError for anything inconsistent or unsupported.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src, out = Path(checkpoint_dir), Path(out_dir)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {src}")
    if not src.is_dir():
        raise ValueError(f"expected a reference checkpoint directory, got a file: {src}")
    config_path = src / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {src} (a reference consolidated checkpoint directory holds "
                                f"{CONFIG_FILE}, {CONSOLIDATE_CONFIG_FILE} and {WEIGHTS_FILE})")
    # Refuse early: the conversion itself can take minutes for a large model.
    newest = latest_checkpoint(out)
    if newest is not None:
        raise ValueError(f"output directory {out} already holds checkpoints (newest: {newest.name}); "
                         "choose a new output directory")

    ref_config = _read_json(config_path)
    model_section = ref_config.get("model")
    if not isinstance(model_section, dict):
        raise ValueError(f"{config_path} has no 'model' section (the reference ModelConf)")
    weights_path, consolidate = locate_weights(src, ref_config)
    # The tokenizer before the weights: its errors are cheap to report, loading the weights may not be.
    tok, tok_desc = resolve_tokenizer(tokenizer, ref_config.get("tokenizer") or {}, src)
    state = load_reference_state_dict(weights_path)
    config = reference_model_config(model_section, state)
    model = _build_model(config, state, DTYPES[dtype])
    del state
    if tok.vocab_size != config.vocab_size:
        extra = (ref_config.get("tokenizer") or {}).get("additional_vocab_size") or 0
        note = (f"; the reference adds additional_vocab_size={extra} placeholder ids to its tokenizer, so the "
                "tokenizer.json must contain those tokens too") if extra else ""
        raise ValueError(f"tokenizer {tok_desc} has vocab_size {tok.vocab_size} but the model's vocabulary is "
                         f"{config.vocab_size}: pass the tokenizer the model was trained with (--tokenizer){note}")

    provenance = str(src.resolve())
    train_config = {
        "converted_from": provenance,
        "source_format": SOURCE_FORMAT,
        "source_weights": weights_path.name,
        "source_dtype": consolidate.get("dtype"),
        "dtype": dtype,
        "tokenizer": tok_desc,
        "reference_config": ref_config,
    }
    run_dir = init_run_dir(out, config, train_config, resume=False)
    # Tokenizer before the checkpoint: a run directory with a checkpoint is complete.
    save_tokenizer(tok, run_dir / TOKENIZER_DIR)
    save_checkpoint(run_dir, 0, model, optimizer=None, scheduler_state=None, keep_last=None,
                    trainer_state={"step": 0, "tokens": 0, "elapsed": 0.0, "converted_from": provenance})
    return run_dir
