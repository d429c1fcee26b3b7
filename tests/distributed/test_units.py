"""In-process checks of the distributed helpers that need no process group."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megalodon_lm.data.dataset import TokenizedCorpus, sample_batch
from megalodon_lm.distributed.checkpoint_dcp import consolidate
from megalodon_lm.distributed.parallelize import resolve_parallel
from megalodon_lm.distributed.train_step import check_chunk_split, local_batch


def _corpus(n: int = 500) -> TokenizedCorpus:
    tokens = np.arange(n, dtype=np.uint16) % 251
    return TokenizedCorpus(tokens=tokens, loss_mask=None, doc_starts=np.zeros(1, np.int64), n_docs=1, n_bytes=n)


@pytest.mark.parametrize(("dp", "cp"), [(1, 1), (2, 1), (1, 2), (3, 2)])
def test_local_batches_tile_the_global_batch(dp, cp):
    corpus, global_b, seq = _corpus(), 6, 24
    x_ref, y_ref = sample_batch(corpus, global_b, seq, 7, 3)
    x = torch.empty_like(x_ref)
    y = torch.empty_like(y_ref)
    b, p = global_b // dp, seq // cp
    for d in range(dp):
        for c in range(cp):
            ctx = SimpleNamespace(dp_rank=d, dp_size=dp, cp_rank=c, cp_size=cp)
            xs, ys = local_batch(corpus, global_b, seq, 7, 3, ctx)
            assert xs.shape == ys.shape == (b, p)
            x[d * b : (d + 1) * b, c * p : (c + 1) * p] = xs
            y[d * b : (d + 1) * b, c * p : (c + 1) * p] = ys
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_local_batch_needs_a_divisible_global_batch():
    ctx = SimpleNamespace(dp_rank=0, dp_size=4, cp_rank=0, cp_size=1)
    with pytest.raises(ValueError, match="global batch \\(6 sequences\\) is not divisible by the 4"):
        local_batch(_corpus(), 6, 24, 0, 0, ctx)


def test_chunk_split_boundaries():
    check_chunk_split(64, 2, 16)
    check_chunk_split(63, 1, 16)  # no chunk parallelism: any length
    for bad in (48, 63, 65):
        with pytest.raises(ValueError, match=f"--seq-len {bad} must be divisible by --chunk-parallel x chunk_size"):
            check_chunk_split(bad, 2, 16)


def test_resolve_parallel():
    assert resolve_parallel("auto", 1) == "none" and resolve_parallel("auto", 2) == "ddp"
    assert resolve_parallel("fsdp", 4) == "fsdp"
    with pytest.raises(ValueError, match="--parallel none cannot train on 2 processes"):
        resolve_parallel("none", 2)
    with pytest.raises(ValueError, match="--parallel must be one of"):
        resolve_parallel("zero", 2)


def test_consolidate_refuses_a_plain_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is not a sharded checkpoint"):
        consolidate(tmp_path)
