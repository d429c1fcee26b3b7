"""Right padding via attention_mask: invisible to real tokens, to the loss and to the carried state."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from .helpers import CHUNK, nano_model, random_ids, rel_err

LENGTHS = [30, 17, 9]  # end at chunk offsets 14, 1, 9 (chunk 16)
L = max(LENGTHS)


@functools.cache
def _setup():
    model = nano_model(seed=11)
    streams = [random_ids(1, 80, seed=20 + i)[0] for i in range(len(LENGTHS))]
    return model, streams


def _padded_batch(rows, lengths, width, pad_seed=99):
    """Rows right-padded with random junk ids (not a fixed pad id: any value must be ignored)."""
    junk = random_ids(len(rows), width, seed=pad_seed)
    ids = junk.clone()
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        ids[b, :n] = row[:n]
        mask[b, :n] = 1
    return ids, mask


def test_padded_rows_match_unpadded_rows():
    model, streams = _setup()
    ids, mask = _padded_batch(streams, LENGTHS, L)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        for b, n in enumerate(LENGTHS):
            alone = model(streams[b][None, :n]).logits[0]
            assert rel_err(out.logits[b, :n], alone) <= 1e-5, f"row {b}"


def test_pad_content_is_irrelevant():
    model, streams = _setup()
    ids1, mask = _padded_batch(streams, LENGTHS, L, pad_seed=1)
    ids2, _ = _padded_batch(streams, LENGTHS, L, pad_seed=2)
    assert not torch.equal(ids1, ids2)
    with torch.no_grad():
        a = model(ids1, attention_mask=mask, return_state=True)
        b = model(ids2, attention_mask=mask, return_state=True)
    real = mask.bool()
    assert torch.allclose(a.logits[real], b.logits[real], rtol=0, atol=1e-6)
    da, db = a.state.to_dict(), b.state.to_dict()
    for k in da:
        assert torch.allclose(da[k], db[k], rtol=0, atol=1e-6), k


def test_bool_and_float_masks_agree():
    model, streams = _setup()
    ids, mask = _padded_batch(streams, LENGTHS, L)
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(ids, attention_mask=mask.bool()).logits
        c = model(ids, attention_mask=mask.float()).logits
    real = mask.bool()
    assert torch.equal(a[real], b[real]) and torch.equal(a[real], c[real])


def test_pads_do_not_change_the_loss():
    model, streams = _setup()
    ids, mask = _padded_batch(streams, LENGTHS, L)
    targets = random_ids(len(LENGTHS), L, seed=5)  # real-looking targets at pad positions too
    with torch.no_grad():
        loss = model(ids, targets=targets, attention_mask=mask).loss
        logits = torch.cat([model(streams[b][None, :n]).logits[0] for b, n in enumerate(LENGTHS)])
        tgt = torch.cat([targets[b, :n] for b, n in enumerate(LENGTHS)])
        expected = F.cross_entropy(logits, tgt)
        # Same loss with -100 written at the pads, and with other pad targets.
        other = targets.masked_fill(mask == 0, -100)
        loss_ignored = model(ids, targets=other, attention_mask=mask).loss
        other = torch.where(mask == 1, targets, random_ids(len(LENGTHS), L, seed=6))
        loss_other = model(ids, targets=other, attention_mask=mask).loss
    assert abs(float(loss) - float(expected)) <= 1e-5 * float(expected)
    assert abs(float(loss_ignored) - float(loss)) <= 1e-6 * float(loss)
    assert abs(float(loss_other) - float(loss)) <= 1e-6 * float(loss)


def test_ignore_index_in_targets():
    """-100 targets are skipped (no shift: targets are aligned with the logits)."""
    model, streams = _setup()
    ids = torch.stack([s[:20] for s in streams])
    targets = random_ids(len(streams), 20, seed=8)
    targets[0, :7] = -100
    targets[2, 15:] = -100
    with torch.no_grad():
        out = model(ids, targets=targets)
    keep = targets != -100
    expected = F.cross_entropy(out.logits[keep], targets[keep])
    assert abs(float(out.loss) - float(expected)) <= 1e-6 * float(expected)


def test_rows_continue_their_own_streams():
    """After a padded call, each row resumes exactly where its real tokens ended."""
    model, streams = _setup()
    calls = [LENGTHS, [20, 3, 25], [5, 16, 1]]  # per call, real tokens per row
    state = None
    consumed = [0] * len(LENGTHS)
    pieces = [[] for _ in LENGTHS]
    with torch.no_grad():
        for c, lengths in enumerate(calls):
            rows = [streams[b][consumed[b]:consumed[b] + n] for b, n in enumerate(lengths)]
            ids, mask = _padded_batch(rows, lengths, max(lengths), pad_seed=c)
            out = model(ids, attention_mask=mask, state=state, return_state=True)
            state = out.state
            for b, n in enumerate(lengths):
                pieces[b].append(out.logits[b, :n])
                consumed[b] += n
            assert state.positions.tolist() == consumed
        for b in range(len(LENGTHS)):
            alone = model(streams[b][None, :consumed[b]]).logits[0]
            assert rel_err(torch.cat(pieces[b]), alone) <= 1e-5, f"row {b}"
    # Each row's offset inside its chunk differs after the first call.
    assert len({n % CHUNK for n in LENGTHS}) == len(LENGTHS)


def test_fully_padded_row_keeps_its_state():
    """A row with no real token in a call is left exactly as it was."""
    model, streams = _setup()
    with torch.no_grad():
        first = model(torch.stack([s[:10] for s in streams]), return_state=True).state
        ids, mask = _padded_batch([s[10:] for s in streams], [6, 0, 12], 12)
        second = model(ids, attention_mask=mask, state=first, return_state=True).state
        assert second.positions.tolist() == [16, 10, 22]
        third = model(torch.stack([s[22:30] for s in streams]), state=second).logits
        alone = model(torch.cat([streams[1][:10], streams[1][22:30]])[None]).logits[0]
    assert rel_err(third[1], alone[10:]) <= 1e-5


def test_left_padding_is_rejected():
    model, streams = _setup()
    ids = torch.stack([s[:8] for s in streams])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=mask)
    mask = torch.ones_like(ids)
    mask[0, 4] = 0  # a hole
    with pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=mask)


def test_non_binary_float_mask_is_rejected():
    model, streams = _setup()
    ids = torch.stack([s[:8] for s in streams])
    with pytest.raises(ValueError, match="0 and 1"):
        model(ids, attention_mask=torch.full(ids.shape, 0.5))
