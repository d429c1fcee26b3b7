"""Conversion between megalodon-lm run directories and transformers model directories.

`export_hf(run_dir, out_dir)` writes config.json (with an `auto_map`) + model.safetensors +
generation_config.json, the loader files `configuration_megalodon.py` / `modeling_megalodon.py` (remote_code.py),
and the run's tokenizer: tokenizer.json (for a byte-level run, the byte tokenizer as a `tokenizers` model, see
tokenizer.py) and a tokenizer_config.json that both `AutoTokenizer` and our `load_tokenizer(out_dir)` read.
So `AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)` and `AutoTokenizer` work in a
script that never imports megalodon_lm.
`import_hf(hf_dir, run_dir)` makes a run directory (one checkpoint) that `load_run` reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER_JSON = "tokenizer.json"


def export_hf(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Export a run's latest (or given-step) checkpoint and tokenizer as a transformers directory."""
    from ..data.tokenizer import save_tokenizer
    from ..fileio import normalize_modes
    from ..models.megalodon import MegalodonLM
    from ..outputs import check_output_dir
    from ..training.loading import load_run
    from .configuration import MegalodonHFConfig
    from .modeling import MegalodonForCausalLM
    from .tokenizer import write_transformers_tokenizer

    check_output_dir(out_dir, "OUT_DIR")  # before loading: a file or read-only place fails in one line
    model, tok = load_run(run_dir, step=step)
    if not isinstance(model, MegalodonLM):
        raise ValueError(f"{run_dir} is a {type(model).__name__} run: only Megalodon runs export to transformers")
    config = MegalodonHFConfig.from_megalodon_config(model.config, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    hf_model = MegalodonForCausalLM(config)
    hf_model.model.load_state_dict(model.state_dict(), strict=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    normalize_modes(out)  # transformers writes its safetensors owner-only
    save_tokenizer(tok, out)
    write_transformers_tokenizer(tok, out)
    return out


def load_model_dir(path: str | Path, device: str | torch.device = "cpu", step: int | None = None):
    """(MegalodonLM in eval mode, tokenizer) from a run directory or a transformers folder (e.g. an export).

    `step` picks a run directory's checkpoint (default latest); a transformers folder has one.
    """
    from ..models.megalodon import MegalodonLM
    from ..training.checkpoint import MODEL_CONFIG_FILE, load_run

    src = Path(path)
    if (src / MODEL_CONFIG_FILE).is_file():
        model, tok = load_run(src, device=device, step=step)
    elif (src / "config.json").is_file():
        from .modeling import MegalodonForCausalLM  # transformers only for a transformers folder

        if step is not None:
            raise ValueError(f"{src} is a transformers folder: it has one checkpoint, no step to choose")
        tok = _load_hf_dir_tokenizer(src, None)
        model = MegalodonForCausalLM.from_pretrained(src).model.eval().to(device)
    else:
        raise FileNotFoundError(f"{src} is neither a megalodon-lm run directory ({MODEL_CONFIG_FILE}) nor a "
                                "transformers folder (config.json)")
    if not isinstance(model, MegalodonLM):
        raise ValueError(f"{src} holds a {type(model).__name__}: this needs a Megalodon model")
    return model, tok


def _load_hf_dir_tokenizer(hf_dir: Path, tokenizer: str | Path | None):
    from ..data.tokenizer import HFTokenizer, load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    try:
        return load_tokenizer(hf_dir)
    except (ValueError, FileNotFoundError):
        if (hf_dir / TOKENIZER_JSON).is_file():  # a transformers tokenizer_config.json next to a tokenizer.json
            return HFTokenizer(hf_dir / TOKENIZER_JSON)
        raise


def import_hf(hf_dir: str | Path, run_dir: str | Path, tokenizer: str | Path | None = None, step: int = 0) -> Path:
    """Make a run directory (model_config.json, tokenizer/, checkpoints/step_N) from a transformers directory.

    tokenizer: 'byte' or a tokenizer path when `hf_dir` holds none that `load_tokenizer` can read.
    """
    from ..data.tokenizer import save_tokenizer
    from ..training.checkpoint import TOKENIZER_DIR, init_run_dir, save_checkpoint
    from ..training.run_lock import lock_run_dir
    from .modeling import MegalodonForCausalLM

    src = Path(hf_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a transformers model directory (no config.json)")
    tok = _load_hf_dir_tokenizer(src, tokenizer)
    hf_model = MegalodonForCausalLM.from_pretrained(src)
    cfg = hf_model.config.to_megalodon_config()
    with lock_run_dir(run_dir):  # a writer, like `train`: one at a time
        path = init_run_dir(run_dir, cfg, {"imported_from": str(src.resolve())}, resume=False)
        save_tokenizer(tok, path / TOKENIZER_DIR)
        save_checkpoint(path, step, hf_model.model, None, None, {"step": step, "imported_from": str(src.resolve())})
    return path
