"""Shared builders for the transformers adapter tests: small HF models, run directories, exported folders."""

from __future__ import annotations

from pathlib import Path

import torch

from megalodon_lm import MegalodonConfig

BPE_TEXT = ["the quick brown fox jumps over the lazy dog " * 20, "hello world, hello megalodon " * 20]


def hf_model(seed: int = 0, **overrides):
    """A small eval-mode `MegalodonForCausalLM` with nonzero biases / norm offsets (misplaced terms show)."""
    import megalodon_lm.hf as hf

    cfg = MegalodonConfig.from_preset("nano", **{"chunk_size": 8, "num_layers": 2, **overrides})
    torch.manual_seed(seed)
    model = hf.MegalodonForCausalLM(hf.MegalodonHFConfig.from_megalodon_config(cfg)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if bool((p == 0).all()):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def random_ids(b: int = 2, n: int = 13, seed: int = 3, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def make_run(run_dir: Path, tok, vocab_size: int, seed: int = 5):
    """A run directory with one checkpoint (step 7) of a seeded nano model; returns the model in eval mode."""
    from megalodon_lm import MegalodonLM
    from megalodon_lm.data.tokenizer import save_tokenizer
    from megalodon_lm.training.checkpoint import TOKENIZER_DIR, init_run_dir, save_checkpoint

    cfg = MegalodonConfig.from_preset("nano", chunk_size=8, num_layers=2, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = MegalodonLM(cfg)
    init_run_dir(run_dir, cfg, {}, resume=False)
    save_tokenizer(tok, run_dir / TOKENIZER_DIR)
    save_checkpoint(run_dir, 7, model, None, None, {"step": 7})
    return model.eval()


def make_bpe(path: Path):
    from megalodon_lm.data.tokenizer import train_bpe

    return train_bpe(BPE_TEXT, 300, path, min_frequency=1)
