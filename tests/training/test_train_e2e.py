"""End-to-end training: the Python API and the CLI on tiny models, the run directory they leave, load_run,
--max-time, prompt/response data, --init-from, BPE tokenizers and bits-per-byte."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import megalodon_lm
from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.data.dataset import IGNORE_INDEX, build_corpora, sample_batch
from megalodon_lm.data.sources import resolve_sources
from megalodon_lm.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from megalodon_lm.training.trainer import evaluate, sample_text

from .conftest import (
    LN2,
    SEQ_LEN,
    TINY_MODEL,
    TOKENS_PER_STEP,
    checkpoint_steps,
    cli,
    eval_lines,
    make_text,
    read_jsonl,
    run_tiny,
    tiny_options,
    train_lines,
    write_toml,
)

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------- one shared tiny run
@pytest.fixture(scope="module")
def basic_run(tmp_path_factory, text_file, cache_dir):
    """6 steps, checkpoints every 2 (keep 2), evaluation every 4 and at the end, a 10-token sample."""
    out = tmp_path_factory.mktemp("basic") / "run"
    result = run_tiny(text_file, out, cache_dir, max_steps=6, save_every=2, keep_last=2, eval_every=4,
                      sample_tokens=10)
    return result


def test_run_directory_layout(basic_run):
    run = Path(basic_run.run_dir)
    info = json.loads((run / "run.json").read_text())
    assert info["format_version"] == 1
    assert info["megalodon_lm_version"] == megalodon_lm.__version__

    mcfg = MegalodonConfig.from_json(run / "model_config.json")
    assert mcfg == MegalodonConfig.from_preset("nano", **TINY_MODEL, vocab_size=257)

    tcfg = json.loads((run / "train_config.json").read_text())
    assert tcfg["max_steps"] == 6 and tcfg["seq_len"] == SEQ_LEN and tcfg["model"] == TINY_MODEL
    assert tcfg["preset"] == "nano" and tcfg["tokenizer"] == "byte"

    tok_cfg = json.loads((run / "tokenizer" / "tokenizer_config.json").read_text())
    assert tok_cfg["type"] == "byte" and tok_cfg["vocab_size"] == 257 and tok_cfg["eos_id"] == 256

    # keep_last=2 of the saves at steps 2, 4, 6; `latest` names the final one.
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert checkpoint_steps(run) == [4, 6]
    for name in ("model.safetensors", "optimizer.pt", "scheduler.json", "trainer_state.json", "rng.safetensors"):
        assert (run / "checkpoints" / "step_00000006" / name).is_file(), name
    state = json.loads((run / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["tokens"] == 6 * TOKENS_PER_STEP
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_result_and_metrics(basic_run):
    r = basic_run
    assert r.step == 6 and r.tokens == 6 * TOKENS_PER_STEP and r.stopped_by == "max_steps"
    assert r.elapsed > 0

    records = read_jsonl(Path(r.run_dir) / "metrics.jsonl")
    assert all(isinstance(rec["step"], int) for rec in records)
    train = train_lines(r.run_dir)
    assert [t["step"] for t in train] == [1, 2, 3, 4, 5, 6]
    for t in train:
        assert set(t) >= {"step", "loss", "tokens", "elapsed"}
        assert math.isfinite(t["loss"]) and t["loss"] > 0
        assert t["tokens"] == t["step"] * TOKENS_PER_STEP  # cumulative
    assert all(a["elapsed"] < b["elapsed"] for a, b in zip(train, train[1:], strict=False))
    assert r.final_train_loss == train[-1]["loss"]

    evals = eval_lines(r.run_dir)
    assert [e["step"] for e in evals] == [4, 6]  # eval_every=4, plus once (not twice) at the end
    for e in evals:
        assert set(e) >= {"step", "tokens", "elapsed", "val_loss", "val_bpb"}
        assert e["tokens"] == e["step"] * TOKENS_PER_STEP
        assert math.isfinite(e["val_loss"]) and math.isfinite(e["val_bpb"])
    assert (r.val_loss, r.val_bpb) == (evals[-1]["val_loss"], evals[-1]["val_bpb"])
    # An untrained byte model scores about ln(257) nats; 6 steps cannot have moved far from that.
    assert 2.0 < r.val_loss < 8.0


def test_load_run_matches_the_trained_model(basic_run, text_file, cache_dir):
    run = Path(basic_run.run_dir)
    model, tok = megalodon_lm.load_run(run)
    again, _ = megalodon_lm.load_run(run)
    assert isinstance(model, MegalodonLM) and not model.training and not again.training
    assert isinstance(tok, ByteTokenizer)
    assert tok.decode(tok.encode("Hello, wörld")) == "Hello, wörld"

    ids = torch.tensor([tok.encode("First Citizen:\nBefore we proceed")])
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, again(ids).logits)
        # An explicitly chosen earlier checkpoint is a different model.
        earlier, _ = megalodon_lm.load_run(run, step=4)
        assert not torch.equal(logits, earlier(ids).logits)

    # The loaded weights are the trained model's final weights: they reproduce the final validation score
    # and the sample the trainer wrote with them.
    _, val = build_corpora(resolve_sources([text_file]), tok, cache_dir, progress=False)
    byte_lengths = torch.tensor(tok.token_byte_lengths())
    val_loss, val_bpb = evaluate(model, val, SEQ_LEN, 64, byte_lengths, torch.device("cpu"),
                                 contextlib.nullcontext)
    assert val_loss == pytest.approx(basic_run.val_loss, rel=1e-6)
    assert val_bpb == pytest.approx(basic_run.val_bpb, rel=1e-6)
    sample = (run / "sample.txt").read_text(encoding="utf-8")
    assert sample.startswith("\n") and len(sample) > 1
    assert sample_text(model, tok, "\n", 10, seed=0) == sample


def test_no_sample_file_without_sample_tokens(tmp_path, text_file, cache_dir):
    r = run_tiny(text_file, tmp_path / "run", cache_dir, max_steps=2, save_every=2, sample_tokens=0)
    assert r.step == 2
    assert not (tmp_path / "run" / "sample.txt").exists()


# ---------------------------------------------------------------------- the CLI
def test_cli_train_with_toml_config(tmp_path, text_file, cache_dir):
    options = tiny_options(text_file, tmp_path / "ignored", cache_dir, max_steps=100, progress="none")
    for key in ("out", "threads", "progress"):
        options.pop(key)
    options["max_time"] = "8m"
    config = write_toml(tmp_path / "run.toml", options)
    out = tmp_path / "cli-run"
    proc = cli("train", "--config", str(config), "--max-steps", "4", "--max-time", "none", "--progress", "plain",
               "--threads", "1", "--sample-tokens", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # Plain log lines, one per step (log_every=1), flags winning over the TOML's max_steps = 100.
    assert [ln.split()[1] for ln in lines if ln.startswith("step ") and " loss " in ln] == ["1/4", "2/4", "3/4",
                                                                                               "4/4"]
    assert any(ln.startswith("step 4: val_loss ") for ln in lines)
    assert any(ln.startswith("stopped by max_steps at step 4 ") for ln in lines)
    assert "\r" not in proc.stdout and "\r" not in proc.stderr  # no progress bar in plain mode
    # The TOML [model] table shaped the model.
    mcfg = MegalodonConfig.from_json(out / "model_config.json")
    assert (mcfg.model_dim, mcfg.num_layers, mcfg.chunk_size) == (32, 1, 16)
    tcfg = json.loads((out / "train_config.json").read_text())
    assert tcfg["max_steps"] == 4 and tcfg["progress"] == "plain" and tcfg["max_time"] in ("", None)
    assert [t["step"] for t in train_lines(out)] == [1, 2, 3, 4]
    assert checkpoint_steps(out) == [2, 4]
    assert (out / "sample.txt").is_file()
    model, _ = megalodon_lm.load_run(out)
    assert model.config == mcfg


# ---------------------------------------------------------------------- --max-time
def test_max_time_stops_the_run(tmp_path, text_file, cache_dir):
    r = run_tiny(text_file, tmp_path / "run", cache_dir, max_steps=100_000, max_time="2s", eval_every=100_000,
                 save_every=100_000, log_every=10)
    # The budget, not the 100k steps, ended the run, however the budget-fitted schedule horizon and the clock
    # happen to race at the end.
    assert r.stopped_by == "max_time"
    assert 10 < r.step < 100_000
    assert r.elapsed < 30.0
    # The run still ends with an evaluation and a checkpoint at the step where it stopped.
    assert checkpoint_steps(tmp_path / "run") == [r.step]
    assert eval_lines(tmp_path / "run")[-1]["step"] == r.step
    state = json.loads((tmp_path / "run" / "checkpoints" / f"step_{r.step:08d}" / "trainer_state.json").read_text())
    assert state["elapsed"] == pytest.approx(r.elapsed, abs=5.0)


# ---------------------------------------------------------------------- prompt/response data
def _write_pairs(path: Path, n: int, prompt_len: int, response_len: int) -> list[tuple[str, str]]:
    pairs = []
    for i in range(n):
        prompt = make_text(prompt_len, seed=2 * i + 1)
        response = make_text(response_len, seed=2 * i + 2)
        pairs.append((prompt, response))
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs), encoding="utf-8")
    return pairs


def test_prompt_response_jsonl_masks_prompt_tokens(tmp_path, text_file, cache_dir):
    data = tmp_path / "pairs.jsonl"
    # Documents of 12 + 20 + 1 tokens: every 32-token window holds prompt targets and response targets.
    pairs = _write_pairs(data, n=40, prompt_len=12, response_len=20)
    r = run_tiny(data, tmp_path / "run", cache_dir, max_steps=3, save_every=3, seed=3)
    assert r.step == 3 and math.isfinite(r.final_train_loss) and math.isfinite(r.val_loss)

    tok = ByteTokenizer()
    train, val = build_corpora(resolve_sources([data]), tok, cache_dir, progress=False)
    # Every document is prompt + response + EOS, and exactly the prompt positions are masked.
    assert train.loss_mask is not None
    assert {len(p.encode()) for p, _ in pairs} == {12}
    mask = torch.from_numpy(train.loss_mask.astype("int64"))
    tokens = torch.from_numpy(train.tokens.astype("int64"))
    assert len(train.doc_starts) > 10
    for start in train.doc_starts[:-1]:
        start = int(start)
        assert mask[start: start + 12].tolist() == [0] * 12
        assert mask[start + 12: start + 33].tolist() == [1] * 21  # response bytes and the EOS
        assert tokens[start + 32] == tok.eos_id

    # The logged first-step loss is the masked loss of the initial model on the first batch, not the loss over
    # all targets (the model is initialised from the seed; batch 0 is a pure function of (seed, step)).
    x, y = sample_batch(train, 2, SEQ_LEN, step=0, seed=3)
    assert (y == IGNORE_INDEX).any() and (y != IGNORE_INDEX).any()
    torch.manual_seed(3)
    init = MegalodonLM(MegalodonConfig.from_json(tmp_path / "run" / "model_config.json"))
    x_all, y_all = sample_batch(dataclasses.replace(train, loss_mask=None), 2, SEQ_LEN, step=0, seed=3)
    assert torch.equal(x_all, x) and (y_all != IGNORE_INDEX).all()
    with torch.no_grad():
        masked = float(init(x, targets=y).loss)
        unmasked = float(init(x, targets=y_all).loss)
    logged = train_lines(tmp_path / "run")[0]["loss"]
    assert logged == pytest.approx(masked, rel=1e-6, abs=1e-6)
    assert abs(logged - unmasked) > 1e-4


def test_prompt_longer_than_seq_len_trains(tmp_path, cache_dir):
    """Instruction data whose prompts exceed one window: some batches have no response target at all.

    Such a batch carries no loss signal; it must not crash the run with a non-finite (0/0) loss.
    """
    data = tmp_path / "long_prompts.jsonl"
    _write_pairs(data, n=30, prompt_len=6 * SEQ_LEN, response_len=8)
    r = run_tiny(data, tmp_path / "run", cache_dir, max_steps=4, save_every=4)
    assert r.step == 4 and r.stopped_by == "max_steps"
    assert all(math.isfinite(t["loss"]) for t in train_lines(tmp_path / "run"))


# ---------------------------------------------------------------------- --init-from
def test_init_from_starts_from_the_source_weights(tmp_path, basic_run, text_file, cache_dir):
    out = tmp_path / "finetune"
    r = run_tiny(text_file, out, cache_dir, init_from=str(basic_run.run_dir), seed=5, max_steps=1, save_every=1,
                 lr=1e-3, warmup_steps=0)
    # A new run: its own step count, a fresh metrics file.
    assert r.step == 1 and r.tokens == TOKENS_PER_STEP
    assert [t["step"] for t in train_lines(out)] == [1]

    # The first step's loss (computed before any update) is the source model's loss on this run's first batch.
    tok = ByteTokenizer()
    train, _ = build_corpora(resolve_sources([text_file]), tok, cache_dir, progress=False)
    x, y = sample_batch(train, 2, SEQ_LEN, step=0, seed=5)
    source, _ = megalodon_lm.load_run(basic_run.run_dir)
    torch.manual_seed(5)
    fresh = MegalodonLM(source.config)
    with torch.no_grad():
        from_source = float(source(x, targets=y).loss)
        from_scratch = float(fresh(x, targets=y).loss)
    logged = train_lines(out)[0]["loss"]
    assert logged == pytest.approx(from_source, rel=1e-6)
    assert abs(logged - from_scratch) > 1e-3
    # One small step later the weights moved away from the source, but not far.
    tuned, _ = megalodon_lm.load_run(out)
    pairs = zip(tuned.state_dict().values(), source.state_dict().values(), strict=True)
    diffs = [float((a - b).abs().max()) for a, b in pairs]
    assert 0 < max(diffs) < 0.05


def test_init_from_a_run_without_checkpoint_is_an_error(tmp_path, text_file, cache_dir):
    with pytest.raises(FileNotFoundError, match="--init-from"):
        run_tiny(text_file, tmp_path / "run", cache_dir, init_from=str(tmp_path / "nothing"))
    assert checkpoint_steps(tmp_path / "run") == []


# ---------------------------------------------------------------------- BPE tokenizer
def test_bpe_tokenizer_cli_then_training(tmp_path, text_file, cache_dir, capsys):
    from megalodon_lm.cli import main

    tok_path = tmp_path / "tok" / "tokenizer.json"
    assert main(["tokenizer", "train", "--data", str(text_file), "--vocab-size", "300", "--out", str(tok_path)]) == 0
    assert "vocab 300" in capsys.readouterr().out
    tok = load_tokenizer(tok_path)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 300

    val_text = make_text(600, seed=11)
    val_file = tmp_path / "val.txt"
    val_file.write_text(val_text, encoding="ascii")
    out = tmp_path / "run"
    r = run_tiny(text_file, out, cache_dir, tokenizer=str(tok_path), val_data=[str(val_file)], max_steps=3,
                 save_every=3, eval_tokens=10_000)
    assert r.step == 3
    assert MegalodonConfig.from_json(out / "model_config.json").vocab_size == tok.vocab_size == 300
    model, run_tok = megalodon_lm.load_run(out)
    assert isinstance(run_tok, HFTokenizer) and run_tok.vocab_size == 300
    assert run_tok.fingerprint() == tok.fingerprint()
    assert model.config.vocab_size == 300 and model.embed.weight.shape[0] == 300
    assert run_tok.decode(run_tok.encode("To be, or not to be")) == "To be, or not to be"
    # Fewer tokens than bytes: the BPE really merged something on this text.
    assert len(run_tok.encode(val_text)) < 0.9 * len(val_text)

    # bits per byte over the whole validation file: targets are ids[1:] + EOS, the EOS counting 0 bytes.
    ids = tok.encode(val_text)
    n_targets = len(ids)  # ids[1:] plus the EOS
    n_bytes = len(val_text.encode()) - len(tok.decode(ids[:1]).encode())
    assert r.val_bpb == pytest.approx(r.val_loss * n_targets / LN2 / n_bytes, rel=1e-9)


# ---------------------------------------------------------------------- bits per byte, byte tokenizer
def test_val_bpb_is_val_loss_in_bits_for_bytes(tmp_path, text_file, cache_dir):
    # 64 targets spread over the validation split (one document cut from the text, ending in its EOS): the
    # last window ends with the EOS, a target of no bytes; every other target is one byte.
    r = run_tiny(text_file, tmp_path / "run", cache_dir, max_steps=2, save_every=2, eval_tokens=64)
    for e in eval_lines(tmp_path / "run"):
        # the record says what was scored
        assert (e["val_sample"], e["val_targets"], e["val_docs"], e["val_bytes"]) == ("spread", 64, 1, 63)
        assert e["val_bpb"] == pytest.approx(e["val_loss"] * 64 / 63 / LN2, rel=1e-12)
    r2 = run_tiny(text_file, tmp_path / "run2", cache_dir, max_steps=2, save_every=2, eval_tokens=10**6)
    assert eval_lines(tmp_path / "run2")[-1]["val_sample"] == "all"  # the whole split fits the budget
    assert r.val_bpb != r2.val_bpb


def test_val_bpb_counts_eos_as_zero_bytes(tmp_path, text_file, cache_dir):
    val_text = make_text(100, seed=5)
    val_file = tmp_path / "val.txt"
    val_file.write_text(val_text, encoding="ascii")
    r = run_tiny(text_file, tmp_path / "run", cache_dir, val_data=[str(val_file)], max_steps=2, save_every=2,
                 eval_tokens=10_000)
    # 100 targets (bytes 1..99 and the EOS) scored; 99 bytes of text among them.
    assert r.val_bpb == pytest.approx(r.val_loss * 100 / 99 / LN2, rel=1e-12)
    # The same score recomputed by hand: consecutive windows of seq_len from the start, each scored alone.
    model, tok = megalodon_lm.load_run(tmp_path / "run")
    ids = torch.tensor([tok.encode(val_text) + [tok.eos_id]])
    nll = 0.0
    with torch.no_grad():
        for start in range(0, 100, SEQ_LEN):
            end = min(start + SEQ_LEN, 100)
            logits = model(ids[:, start:end]).logits
            nll += float(F.cross_entropy(logits[0], ids[0, start + 1: end + 1], reduction="sum"))
    assert r.val_loss == pytest.approx(nll / 100, rel=1e-5)
    assert r.val_bpb == pytest.approx(nll / 99 / LN2, rel=1e-5)
