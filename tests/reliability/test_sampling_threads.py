"""Sampling per row: a ragged sampled batch equals each prompt sampled alone with the same seed. Threads: a default
that never exceeds the CPUs this process may use, and --threads on generate and eval."""

from __future__ import annotations

import pytest
import torch

import megalodon_lm.runtime as runtime
from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.cli import main
from megalodon_lm.generation import generate
from megalodon_lm.generation.sampling import row_generators, sample_rows

PROMPTS = [[1, 2, 3], list(range(10, 60)), [200] * 7, list(range(5, 30))]
OPTIONS = [dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=1.2, top_p=0.9),
           dict(temperature=1.0, repetition_penalty=1.3)]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model() -> MegalodonLM:
    torch.manual_seed(0)
    return MegalodonLM(MegalodonConfig.from_preset("nano", num_layers=1, chunk_size=16)).eval()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_ragged_sampled_batch_equals_each_prompt_alone(model, options):
    batch = generate(model, PROMPTS, max_new_tokens=24, seed=7, **options)
    for i, prompt in enumerate(PROMPTS):
        assert torch.equal(batch[i], generate(model, [prompt], max_new_tokens=24, seed=7, **options)[0]), i


def test_per_row_seeds_and_generators(model):
    seeds = [11, 12, 13, 14]
    batch = generate(model, PROMPTS, max_new_tokens=12, temperature=1.0, seed=seeds)
    for i, prompt in enumerate(PROMPTS):
        assert torch.equal(batch[i], generate(model, [prompt], max_new_tokens=12, temperature=1.0, seed=seeds[i])[0])
    same = generate(model, [PROMPTS[0]] * 2, max_new_tokens=12, temperature=1.0, seed=[1, 2])
    assert not torch.equal(same[0], same[1])  # one seed per row: different samples of one prompt


def test_sample_rows_draws_each_row_from_its_own_stream():
    logits = torch.randn(3, 50)
    alone = [sample_rows(logits[b : b + 1], [torch.Generator().manual_seed(b)], 1.0) for b in range(3)]
    together = sample_rows(logits, [torch.Generator().manual_seed(b) for b in range(3)], 1.0)
    assert together.tolist() == [int(t) for t in alone]
    with pytest.raises(ValueError, match="holds 2 per-row seeds, but there are 3 prompts"):
        row_generators([1, 2], 3)


def test_default_threads_never_exceed_the_available_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "_TORCH_DEFAULT_THREADS", 64)  # a big machine's core count
    monkeypatch.setattr(runtime, "_cgroup_cpu_quota", lambda: 2.5)  # a container allowed 2.5 CPUs
    assert runtime.default_threads() == min(2, runtime.available_cpus()) == runtime.available_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit setting wins
    assert runtime.default_threads() == 3
    with pytest.raises(ValueError, match="--threads must be an integer >= 1, got 0"):
        runtime.set_threads(0)


def test_generate_and_eval_take_threads(finished_run, text_file, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["generate", str(finished_run), "--prompt", "a", "--max-new-tokens", "2", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        assert main(["eval", "ppl", str(finished_run), "--data", str(text_file), "--max-docs", "1", "--contexts", "8",
                     "--score-tokens", "8", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
