"""The batching engine: rows that join, leave and prefill in pieces give exactly what each gives alone."""

from __future__ import annotations

import threading

import pytest
import torch

from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.data.tokenizer import ByteTokenizer
from megalodon_lm.generation import generate
from megalodon_lm.serve.engine import BatchEngine, Request
from megalodon_lm.serve.sampling import RowSampler, new_generator

from .helpers import TINY


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MegalodonLM(MegalodonConfig.from_preset("nano", **TINY)).eval()


class Collector:
    def __init__(self) -> None:
        self.text, self.result, self.error = "", None, None
        self.done = threading.Event()

    def __call__(self, kind, payload) -> None:
        if kind == "text":
            self.text += payload
        elif kind == "done":
            self.result = payload
            self.done.set()
        else:
            self.error = payload
            self.done.set()


def _request(model, prompt, n, seed=None, temperature=0.0, state=None, stops=()):
    c = Collector()
    sampler = RowSampler(temperature, None, None, None, new_generator(seed or 0), model.config.vocab_size)
    return Request(list(prompt), state, n, sampler, list(stops), None, c), c


def _run(engine, requests, timeout=120.0):
    for r, _ in requests:
        engine.submit(r)
    for _, c in requests:
        assert c.done.wait(timeout), "engine did not finish"
        assert c.error is None, c.error


def _prompts(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(L),), generator=g).tolist() for L in torch.randint(1, 60, (n,), generator=g)]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_eight_concurrent_requests_equal_each_alone(model, temperature):
    """8 prompts of different lengths (1..59 tokens, chunk 16) and different output lengths decoded together,
    joining and leaving between steps, give the same tokens as each alone and as `generate`."""
    prompts = _prompts()
    lengths = [5 + 3 * i for i in range(8)]
    engine = BatchEngine(model, ByteTokenizer(), max_batch=16, prefill_chunk=24)
    engine.start()
    try:
        together = [_request(model, p, n, seed=i, temperature=temperature) for i, (p, n) in
                    enumerate(zip(prompts, lengths, strict=True))]
        _run(engine, together)
        assert engine.steps < sum(lengths)  # batched: fewer steps than tokens
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            alone = [_request(model, p, n, seed=i, temperature=temperature)]
            _run(engine, alone)
            got_together = together[i][1].result
            got_alone = alone[0][1].result
            assert got_together.text == got_alone.text
            assert got_together.pending == got_alone.pending
            for a, b in zip(got_together.state.to_dict().values(), got_alone.state.to_dict().values(), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            if temperature == 0:
                ref = generate(model, [p], max_new_tokens=n, temperature=0)[0].tolist()
                assert ByteTokenizer().decode(ref) == got_alone.text
                assert got_alone.pending == ref[-1:]
    finally:
        engine.stop()


def test_long_prompt_is_prefilled_in_pieces_without_stalling_others(model):
    """A 400-token prompt arriving while another request decodes is fed 32 tokens per step: the decoding
    request keeps getting a token every step and finishes before the long prompt's prefill does."""
    engine = BatchEngine(model, ByteTokenizer(), max_batch=4, prefill_chunk=32)
    steps_at_text: list[int] = []
    short, sc = _request(model, [1, 2, 3], 6)
    inner = sc.__call__

    def record(kind, payload):
        if kind == "text":
            steps_at_text.append(engine.steps)
        inner(kind, payload)

    short.on_event = record
    long_prompt = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(3)).tolist()
    long, lc = _request(model, long_prompt, 3)
    engine.start()
    try:
        engine.submit(long)
        engine.submit(short)
        assert sc.done.wait(60) and lc.done.wait(60)
        assert steps_at_text == list(range(steps_at_text[0], steps_at_text[0] + 6))
        assert engine.prefill_pieces >= 400 // 32
        assert sc.result is not None and lc.result is not None
        ref = generate(model, [long_prompt], max_new_tokens=3, temperature=0)[0].tolist()
        assert lc.result.pending == ref[-1:]
    finally:
        engine.stop()


def test_cancelled_request_leaves_and_others_continue(model):
    engine = BatchEngine(model, ByteTokenizer(), max_batch=4, prefill_chunk=64)
    a, ac = _request(model, [5, 6, 7], 200)
    b, bc = _request(model, [8, 9], 30)
    engine.start()
    try:
        engine.submit(a)
        engine.submit(b)
        a.cancel()
        assert bc.done.wait(60) and bc.error is None
        assert not ac.done.is_set() and engine.load()["decoding"] == 0
    finally:
        engine.stop()
    assert ac.done.is_set() is False  # a cancelled request gets no result, not even at shutdown


def test_stop_string_ends_the_row_with_the_tail(model):
    engine = BatchEngine(model, ByteTokenizer(), max_batch=2, prefill_chunk=64)
    probe, pc = _request(model, [10, 11, 12], 20)
    engine.start()
    try:
        _run(engine, [(probe, pc)])
        text = pc.result.text
        stop = text[5:7]
        r, c = _request(model, [10, 11, 12], 20, stops=[stop])
        _run(engine, [(r, c)])
    finally:
        engine.stop()
    cut = text.index(stop)
    assert c.result.text == text[:cut] and c.result.finish_reason == "stop"
    assert c.result.tail.startswith(stop) and c.text == text[:cut]
