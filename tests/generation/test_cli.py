"""`megalodon-lm generate` on a tiny run directory: streamed text, prompts, saved streams, errors."""

from __future__ import annotations

import argparse
import io
import sys

import pytest
import torch

import megalodon_lm
from megalodon_lm.generation import generate, load_state, read_state_info
from megalodon_lm.generation.cli import add_generate_parser

TINY_MODEL = dict(num_layers=1, model_dim=32, z_dim=16, value_dim=32, num_heads=1, ffn_hidden_dim=64, chunk_size=8,
                  norm_num_groups=4)
PROMPT = "héllo wörld ✓ "


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate-cli")
    data = tmp / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. héllo wörld ✓\n" * 100, encoding="utf-8")
    threads = torch.get_num_threads()
    try:
        megalodon_lm.train(None, preset="nano", model=dict(TINY_MODEL), data=[str(data)], seq_len=32, batch_size=2,
                           max_steps=2, warmup_steps=0, save_every=1, eval_every=2, eval_tokens=64, max_time="",
                           progress="none", tensorboard=False, sample_tokens=0, cache_dir=str(tmp / "cache"),
                           out=str(tmp / "run"), threads=1)
    finally:
        torch.set_num_threads(threads)
    return tmp / "run"


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Parse with a parser holding only `generate` (cli.py wires it into `megalodon-lm` itself)."""
    parser = argparse.ArgumentParser(prog="megalodon-lm")
    add_generate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", *argv])
    capsys.readouterr()
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def _api_text(run_dir, prompt: str, n: int, **kwargs) -> str:
    model, tok = megalodon_lm.load_run(run_dir, step=kwargs.pop("step", None))
    ids = tok.encode(prompt) or [tok.eos_id]
    return tok.decode(generate(model, [ids], max_new_tokens=n, **kwargs)[0].tolist())


def test_echo_prints_the_prompt_first(run_dir, capsys):
    code, out, _ = _cli(capsys, str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0",
                        "--echo")
    assert code == 0
    assert out == PROMPT + _api_text(run_dir, PROMPT, 8, temperature=0, eos_token_id=256)


def test_greedy_text_equals_the_api(run_dir, capsys):
    code, out, err = _cli(capsys, str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "24", "--temperature", "0")
    assert code == 0
    assert out == _api_text(run_dir, PROMPT, 24, temperature=0, eos_token_id=256)
    assert "tokens/s" in err and "prompt 18 tokens" in err  # 18 UTF-8 bytes


def test_sampling_defaults_equal_the_api(run_dir, capsys):
    code, out, _ = _cli(capsys, str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "20", "--no-stop-at-eos")
    assert code == 0
    assert out == _api_text(run_dir, PROMPT, 20, temperature=0.8, top_k=50, seed=0)


def test_empty_prompt_starts_a_new_document(run_dir, capsys):
    _, out, _ = _cli(capsys, str(run_dir), "--prompt", "", "--max-new-tokens", "8", "--temperature", "0")
    assert out == _api_text(run_dir, "", 8, temperature=0, eos_token_id=256)  # from the EOS token


def test_prompt_file_and_stdin(run_dir, capsys, tmp_path, monkeypatch):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT, encoding="utf-8")
    common = ("--max-new-tokens", "8", "--temperature", "0")
    _, from_arg, _ = _cli(capsys, str(run_dir), "--prompt", PROMPT, *common)
    _, from_file, _ = _cli(capsys, str(run_dir), "--prompt-file", str(path), *common)
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    _, from_stdin, _ = _cli(capsys, str(run_dir), *common)
    assert from_arg == from_file == from_stdin


def _same_stream(path_a, path_b) -> bool:
    """Two saved streams hold the same tokens: equal pending tokens and bitwise-equal states."""
    a, b = load_state(path_a).to_dict(), load_state(path_b).to_dict()
    same_state = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return same_state and read_state_info(path_a).next_tokens == read_state_info(path_b).next_tokens


def test_save_then_load_state_continues_the_stream(run_dir, capsys, tmp_path):
    whole, part1, part2 = (tmp_path / f"{name}.safetensors" for name in ("whole", "part1", "part2"))
    for sampling in (("--temperature", "0"), ("--temperature", "1.0", "--top-k", "0", "--seed", "5")):
        common = ("--no-stop-at-eos", *sampling)
        _, text, _ = _cli(capsys, str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "16", "--save-state",
                          str(whole), *common)
        _, text1, _ = _cli(capsys, str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "7", "--save-state",
                           str(part1), *common)
        resumed = [a for a in common if a not in ("--seed", "5")]  # the saved sampler state continues the draws
        _, text2, _ = _cli(capsys, str(run_dir), "--prompt", "", "--max-new-tokens", "9", "--load-state", str(part1),
                           "--save-state", str(part2), *resumed)
        assert _same_stream(whole, part2)
        assert not _same_stream(whole, part1)
        # Text is compared only up to the split: a multi-byte character may straddle it.
        assert text.startswith(text1.rstrip("\ufffd"))
        assert read_state_info(whole).config is not None


def test_zero_tokens_then_continue(run_dir, capsys, tmp_path):
    state = tmp_path / "prefilled.safetensors"
    code, out, _ = _cli(capsys, str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "0", "--save-state", str(state))
    assert code == 0 and out == ""
    assert read_state_info(state).next_tokens == [list(PROMPT.encode())[-1]]
    _, cont, _ = _cli(capsys, str(run_dir), "--prompt", "", "--load-state", str(state), "--max-new-tokens", "10",
                      "--temperature", "0")
    assert cont == _api_text(run_dir, PROMPT, 10, temperature=0, eos_token_id=256)


def test_continuation_prompt_is_appended(run_dir, capsys, tmp_path):
    state = tmp_path / "s.safetensors"
    greedy = ("--temperature", "0", "--no-stop-at-eos")
    _, part1, _ = _cli(capsys, str(run_dir), "--prompt", "ab", "--max-new-tokens", "5", "--save-state", str(state),
                       *greedy)
    _, part2, _ = _cli(capsys, str(run_dir), "--prompt", "cd", "--max-new-tokens", "5", "--load-state", str(state),
                       *greedy)
    model, tok = megalodon_lm.load_run(run_dir)
    first = generate(model, [tok.encode("ab")], max_new_tokens=5, temperature=0)[0].tolist()
    whole = tok.encode("ab") + first + tok.encode("cd")
    assert part2 == tok.decode(generate(model, [whole], max_new_tokens=5, temperature=0)[0].tolist())


def test_interrupt_keeps_a_consistent_state(run_dir, capsys, tmp_path, monkeypatch):
    gen_module = sys.modules["megalodon_lm.generation.decoding"]
    real = gen_module.stream_generate

    def interrupted(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 4:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(gen_module, "stream_generate", interrupted)
    part, whole = tmp_path / "part.safetensors", tmp_path / "whole.safetensors"
    greedy = ("--temperature", "0", "--no-stop-at-eos", "--prompt", PROMPT)
    code, _, err = _cli(capsys, str(run_dir), "--max-new-tokens", "10", "--save-state", str(part), *greedy)
    assert code == 130 and "4 tokens" in err
    monkeypatch.setattr(gen_module, "stream_generate", real)
    _cli(capsys, str(run_dir), "--max-new-tokens", "4", "--save-state", str(whole), *greedy)
    assert _same_stream(part, whole)


def test_step_picks_a_checkpoint(run_dir, capsys):
    _, out, _ = _cli(capsys, str(run_dir), "--step", "1", "--prompt", PROMPT, "--max-new-tokens", "8",
                     "--temperature", "0")
    assert out == _api_text(run_dir, PROMPT, 8, temperature=0, eos_token_id=256, step=1)
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint for step 7"):
        _cli(capsys, str(run_dir), "--step", "7", "--prompt", "x")


@pytest.mark.parametrize("argv, exc, message", [
    (("--top-p", "1.5"), ValueError, r"top_p must lie in \(0, 1\]"),
    (("--top-k", "-1"), ValueError, r"--top-k must be >= 0"),
    (("--temperature", "-1"), ValueError, r"temperature must be a finite number >= 0"),
    (("--max-new-tokens", "-2"), ValueError, r"max_new_tokens must be >= 0"),
    (("--repetition-penalty", "0"), ValueError, r"repetition_penalty must be a finite number > 0"),
    (("--load-state", "/nonexistent/state.safetensors"), FileNotFoundError, r"state file not found"),
    (("--prompt-file", "/nonexistent/prompt.txt"), FileNotFoundError, r"--prompt-file not found"),
    (("--device", "tpu"), ValueError, r"--device"),
])
def test_bad_input_raises_for_cli_main(run_dir, capsys, argv, exc, message):
    if "--prompt-file" not in argv:
        argv = ("--prompt", "x", *argv)
    with pytest.raises(exc, match=message):
        _cli(capsys, str(run_dir), *argv)


def test_bad_options_fail_before_loading_the_model(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"top_p must lie in"):
        _cli(capsys, str(tmp_path / "no-run-here"), "--prompt", "x", "--top-p", "2")


def test_not_a_run_directory(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"not a megalodon-lm run directory"):
        _cli(capsys, str(tmp_path), "--prompt", "x")


def test_state_of_another_model_is_refused(run_dir, capsys, tmp_path):
    from megalodon_lm import MegalodonConfig, MegalodonLM
    from megalodon_lm.generation import save_state

    other = MegalodonLM(MegalodonConfig.from_preset("nano", **{**TINY_MODEL, "vocab_size": 257, "chunk_size": 16}))
    path = save_state(other.init_state(1), tmp_path / "other.safetensors", other)
    with pytest.raises(ValueError, match=r"chunk_size: file 16, model 8"):
        _cli(capsys, str(run_dir), "--prompt", "x", "--load-state", str(path))
