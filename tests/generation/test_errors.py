"""Bad calls to `generate` fail at once with one clear ValueError/TypeError line."""

from __future__ import annotations

import functools

import pytest
import torch

from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.generation import generate, stream_generate


@functools.cache
def _model() -> MegalodonLM:
    torch.manual_seed(0)
    return MegalodonLM(MegalodonConfig.from_preset("nano", num_layers=1, chunk_size=8)).eval()


PROMPT = torch.tensor([[1, 2, 3]])

BAD_OPTIONS = [
    (dict(max_new_tokens=-1), ValueError, r"max_new_tokens must be >= 0"),
    (dict(max_new_tokens=2.0), TypeError, r"max_new_tokens must be an int"),
    (dict(top_p=0.0), ValueError, r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must lie in \(0, 1\]"),
    (dict(top_k=0), ValueError, r"top_k must be >= 1"),
    (dict(top_k=2.5), TypeError, r"top_k must be an int"),
    (dict(temperature=-0.1), ValueError, r"temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), ValueError, r"temperature must be a finite number >= 0"),
    (dict(repetition_penalty=0.0), ValueError, r"repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=-1.0), ValueError, r"repetition_penalty must be a finite number > 0"),
    (dict(eos_token_id=256), ValueError, r"eos_token_id must be None or an int in \[0, 256\)"),
    (dict(prefill_chunk=0), ValueError, r"prefill_chunk must be a positive int"),
    (dict(seed="x"), TypeError, r"seed must be an int, a torch.Generator, a sequence of those or None"),
    (dict(state="x"), TypeError, r"state must be a StreamState"),
]


@pytest.mark.parametrize("bad, exc, message", BAD_OPTIONS, ids=[next(iter(b)) + "=" + repr(next(iter(b.values())))
                                                               for b, _, _ in BAD_OPTIONS])
def test_bad_options(bad, exc, message):
    kwargs = dict(max_new_tokens=2, temperature=1.0)
    kwargs.update(bad)
    with pytest.raises(exc, match=message):
        generate(_model(), PROMPT, **kwargs)
    with pytest.raises(exc, match=message):  # the stream checks at the call, before its first token
        stream_generate(_model(), PROMPT, **kwargs)


BAD_PROMPTS = [
    ([], ValueError, r"prompt_ids is an empty list"),
    ([[1, 2], []], ValueError, r"prompt row 1 is empty"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, r"prompt row 0 is empty"),
    (torch.zeros(0, 3, dtype=torch.long), ValueError, r"no rows"),
    (torch.tensor([[1.0, 2.0]]), TypeError, r"integer token ids"),
    ([[1.5, 2.0]], TypeError, r"row 0 must hold integer token ids"),
    ([torch.tensor([True, False])], TypeError, r"row 0 must hold integer token ids"),
    ([1, 2, 3], TypeError, r"one 1-D sequence of token ids per row"),
    (torch.tensor([1, 2, 3]), ValueError, r"must be 2-D \(batch, length\)"),
    ("hello", TypeError, r"must be a \(B, L\) integer tensor or a list"),
    ([[1, 256]], ValueError, r"prompt token ids must lie in \[0, 256\).*\[1, 256\]"),
    (torch.tensor([[-1, 3]]), ValueError, r"prompt token ids must lie in \[0, 256\)"),
]


@pytest.mark.parametrize("prompt, exc, message", BAD_PROMPTS, ids=[m.split("\\")[0][:30] for _, _, m in BAD_PROMPTS])
def test_bad_prompts(prompt, exc, message):
    with pytest.raises(exc, match=message):
        generate(_model(), prompt, max_new_tokens=1)


def test_prompt_error_is_one_line_and_checked_before_any_work():
    with pytest.raises(ValueError) as info:
        generate(_model(), [[5] * 10_000 + [999]], max_new_tokens=1)
    assert "\n" not in str(info.value)


def test_state_for_another_batch_size():
    _, state = generate(_model(), PROMPT, max_new_tokens=1, return_state=True)
    with pytest.raises(ValueError, match=r"state is for batch size 1, but there are 2 prompts"):
        generate(_model(), [[1], [2]], max_new_tokens=1, state=state)

