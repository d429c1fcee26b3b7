"""The training loop behind `megalodon-lm train` and `megalodon_lm.train(...)`.

Deterministic by construction: the model is initialised from `seed`, every batch is drawn from
(seed, step), and a checkpoint holds weights, optimizer, schedule, RNG and step. Resuming therefore
continues the exact same run (bitwise on CPU in fp32 with a fixed thread count).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.dataset import build_corpora, bytes_per_target, sample_batch, sample_eval_windows
from ..data.packing import DocumentMaskedForward
from ..data.sources import resolve_sources
from ..data.tokenizer import load_tokenizer, save_tokenizer
from ..device import resolve_device
from ..generation.decoding import stream_generate
from ..models import MegalodonConfig, MegalodonLM
from ..models.llama_baseline import LlamaLM, arch_config, build_model, sample_llama_text, save_arch
from ..outputs import check_output_dir
from ..runtime import set_threads, tune_cpu_allocator
from .budget import TimeBudget, measure_decode, measure_eval
from .checkpoint import CHECKPOINTS_DIR, init_run_dir, is_sharded, latest_checkpoint, save_checkpoint
from .config import TrainConfig, default_run_dir, resolve_config, resolve_resume_config
from .fallback import check_resume_state, choose_resume_checkpoint, newest_verified_checkpoint
from .loading import load_checkpoint, load_model_weights, read_model_config
from .manifest import CorruptCheckpointError, NonFiniteError
from .memory import check_memory, estimate_training_memory
from .metrics import MetricsLogger, format_duration, parse_duration, plot_metrics, read_metrics
from .progress import Progress
from .resume import plan_resume, read_checkpoint_state, record_resumed_limits
from .run_lock import lock_run_dir
from .schedule import WarmupCosine
from .stop import StopFlag

# With --max-time, the schedule's horizon is fixed once the warm-up ends (the warm-up does not depend on
# it, so the learning rate stays continuous), from the step time measured after the first few steps (budget.py).
CALIBRATION_MIN_STEPS = 10
CALIBRATION_SKIP = 3  # first steps of a session are slower (allocator, caches): not timed
RECENT_STEPS = 10  # the step time the budget uses: the median of the last few steps (robust to spikes)
REPROBE_AFTER = 0.02  # before stopping, re-time the end-of-run costs if the last timing is older (of --max-time)
EVAL_BATCH = 8  # validation windows scored per forward


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite loss, ...); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed: float
    final_train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    stopped_by: str  # "max_steps" | "max_time" | "signal" | "nothing_left" (a --resume with no step to train)
    signal: int | None = None  # the signal number when stopped_by == "signal"


def train(config: str | Path | None = None, **options: Any) -> TrainResult:
    """Python API mirroring `megalodon-lm train`: keyword arguments are the CLI options (underscored).

    `config` is an optional TOML file. With `resume=True` the run's saved options are used; only
    run-time options (out, max_time, progress, threads, ...) may be given again.
    """
    if options.get("resume"):
        return run_training(resolve_resume_config(options, config))
    return run_training(resolve_config(options, config))


def _model_config(cfg: TrainConfig, vocab_size: int) -> MegalodonConfig:
    """Preset + [model] overrides; the vocabulary always comes from the tokenizer."""
    overrides = dict(cfg.model)
    if "vocab_size" in overrides and overrides["vocab_size"] != vocab_size:
        raise ValueError(f"model vocab_size {overrides['vocab_size']} disagrees with the tokenizer's {vocab_size}")
    overrides["vocab_size"] = vocab_size
    return MegalodonConfig.from_preset(cfg.preset, **overrides)


def _init_from_config(src: Path, vocab_size: int) -> MegalodonConfig:
    """Fine-tuning keeps the source run's architecture; its vocabulary must match the tokenizer."""
    if latest_checkpoint(src) is None or not (src / "model_config.json").is_file():
        raise FileNotFoundError(f"--init-from: no checkpoint in {src}")
    mcfg = read_model_config(src / "model_config.json")
    if mcfg.vocab_size != vocab_size:
        raise ValueError(f"--init-from {src}: its vocabulary ({mcfg.vocab_size}) differs from the tokenizer's "
                         f"({vocab_size}); use the source run's tokenizer ({src / 'tokenizer'})")
    return mcfg


@torch.no_grad()
def evaluate(model: MegalodonLM, corpus, seq_len: int, max_tokens: int, byte_lengths: torch.Tensor,
             device: torch.device, autocast, should_stop: Callable[[], bool] | None = None,
             info: dict[str, Any] | None = None) -> tuple[float, float] | None:
    """Validation loss (nats per token) and bits per byte over fixed windows of the validation data.

    The windows are `sample_eval_windows`: all of the split when it fits in `max_tokens`, else an evenly spread
    sample of every document. `info`, when given, receives what was scored (val_sample, val_targets, val_docs,
    val_docs_total) and the scored text bytes (val_bytes). `should_stop` is asked before each batch; when it
    says yes the evaluation is abandoned and None returned.
    """
    was_training = model.training
    model.eval()
    nll, count, n_bytes = 0.0, 0, 0
    windows, described = sample_eval_windows(corpus, seq_len, max_tokens)
    full = [w for w in windows if w[0].shape[1] == seq_len]
    groups = [full[i : i + EVAL_BATCH] for i in range(0, len(full), EVAL_BATCH)]
    groups += [[w] for w in windows if w[0].shape[1] != seq_len]  # a shorter last window goes alone
    for group in groups:
        if should_stop is not None and should_stop():
            model.train(was_training)
            return None
        x = torch.cat([w[0] for w in group]).to(device)
        y = torch.cat([w[1] for w in group]).to(device)
        with autocast():
            logits = model(x).logits
        nll += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum"))
        count += int((y != -100).sum())
        n_bytes += int(bytes_per_target(y.cpu(), byte_lengths))
    model.train(was_training)
    if info is not None:
        info.update(described, val_bytes=n_bytes)
    return nll / max(count, 1), nll / math.log(2) / max(n_bytes, 1)


def run_training(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) one training run described by a validated `TrainConfig`.

    Under torchrun (RANK/WORLD_SIZE set) the run is distributed: see megalodon_lm.distributed.run.
    """
    cfg.validate()
    from ..distributed.env import is_torchrun

    if not is_torchrun():
        if cfg.chunk_parallel > 1:
            raise ValueError("--chunk-parallel needs several processes: launch with torchrun (docs/distributed.md)")
        with contextlib.ExitStack() as hold:  # holds the run directory's lock until the run is over
            return _run_training(cfg, None, hold)
    from ..distributed.run import DistributedRun

    drun = DistributedRun(cfg)
    try:
        with contextlib.ExitStack() as hold:
            return _run_training(cfg, drun, hold)
    finally:
        drun.close()


def _check_memory(cfg: TrainConfig, mcfg: MegalodonConfig, device: torch.device, drun) -> None:
    """Refuse a model that cannot fit before building it (training/memory.py); --no-memory-check skips this."""
    if not cfg.memory_check:
        return
    batch, shards, processes = cfg.batch_size, 1, 1
    if drun is not None:
        shards = drun.ctx.world_size if drun.kind == "fsdp" else 1
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    estimate = estimate_training_memory(mcfg, batch, cfg.seq_len, bf16=cfg.dtype == "bf16",
                                        activation_checkpointing=cfg.activation_checkpointing, shards=shards)
    check_memory(estimate, device, processes, what=f"preset {cfg.preset!r} at --batch-size {batch} --seq-len "
                                                   f"{cfg.seq_len}")


def _resume_checkpoint(run_dir: Path, drun) -> Path:
    """The checkpoint a resume continues from: the newest that verifies, each skipped one reported in one line.
    Under torchrun rank 0 verifies (it hashes every shard) and the others take its choice."""
    if drun is None:
        return choose_resume_checkpoint(run_dir, _report)
    chosen, error = None, None
    if drun.is_main:
        try:
            chosen = choose_resume_checkpoint(run_dir, _report)
        except CorruptCheckpointError as exc:
            error = exc
    step = drun.from_main(-1 if chosen is None else int(chosen.name.split("_")[1]))
    if step < 0:
        raise error if error is not None else CorruptCheckpointError(f"no loadable checkpoint in {run_dir}")
    return run_dir / CHECKPOINTS_DIR / f"step_{step:08d}"


def _run_training(cfg: TrainConfig, drun, hold: contextlib.ExitStack) -> TrainResult:
    t_session = time.perf_counter()  # the budget counts the whole session, data preparation included
    main = drun is None or drun.is_main
    device = resolve_device(cfg.device) if drun is None else drun.device
    if device.type == "cpu":
        tune_cpu_allocator()  # see megalodon_lm.runtime: keeps long-sequence steps from re-faulting memory
    set_threads(cfg.threads)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.resume)

    # ---- everything that can fail on bad input happens before any training
    check_output_dir(run_dir, "output directory")  # before tokenizing: a file or read-only place fails now
    if cfg.resume and latest_checkpoint(run_dir) is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}")
    if cfg.resume and drun is None and is_sharded(latest_checkpoint(run_dir)):
        raise ValueError(f"{latest_checkpoint(run_dir)} was saved by a distributed run: resume it under torchrun "
                         "(any number of processes, 1 included)")
    resume_from = _resume_checkpoint(run_dir, drun) if cfg.resume else None
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    if drun is not None:
        tokens_per_step = drun.global_batch * cfg.seq_len * cfg.grad_accum
    budget = TimeBudget(parse_duration(cfg.max_time) if cfg.max_time else None, tokens_per_step, cfg.eval_tokens,
                        cfg.sample_tokens)
    plan = None
    if cfg.resume:
        state, sched_state = read_checkpoint_state(resume_from)
        plan = plan_resume(cfg, run_dir, state, sched_state, budget)
        if plan.nothing_left:  # one line, nothing evaluated or written
            if main:
                print(plan.nothing_left, flush=True)
            return TrainResult(run_dir, state["step"], state["tokens"], state["elapsed"], None, None, None,
                               "nothing_left")
    tokenizer = load_tokenizer(run_dir / "tokenizer") if cfg.resume else load_tokenizer(cfg.tokenizer)
    if cfg.resume:
        mcfg = read_model_config(run_dir / "model_config.json")
    elif cfg.init_from:
        mcfg = _init_from_config(Path(cfg.init_from), tokenizer.vocab_size)
    else:
        mcfg = _model_config(cfg, tokenizer.vocab_size)
    arch_source = run_dir if cfg.resume else cfg.init_from
    arch_config(cfg.arch, mcfg, cfg.seq_len, arch_source)  # --arch llama: a matching LlamaConfig exists
    sources = resolve_sources(cfg.data) if cfg.data else None
    val_sources = resolve_sources(cfg.val_data) if cfg.val_data else None
    schedule = WarmupCosine(base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                            min_lr_ratio=cfg.min_lr_ratio)
    show = main and (cfg.progress == "bar" or (cfg.progress == "auto" and sys.stderr.isatty()))
    if drun is not None:
        if cfg.document_masking or cfg.arch != "megalodon":
            raise ValueError("under torchrun only --arch megalodon without --document-masking is supported yet")
        drun.check_model(mcfg)
    _check_memory(cfg, mcfg, device, drun)
    with contextlib.nullcontext() if drun is None else drun.main_first():  # rank 0 fills the shared cache
        train_data, val_data = build_corpora(sources, tokenizer,
                                             cfg.cache_dir or Path.home() / ".cache" / "megalodon-lm",
                                             val_sources=val_sources, progress=show)
    if len(train_data.tokens) < cfg.seq_len + 1:
        raise ValueError(f"training data has {len(train_data.tokens)} tokens, fewer than one window of "
                         f"--seq-len {cfg.seq_len} + 1")
    budget.eval_tokens = min(cfg.eval_tokens, len(val_data.tokens) - 1)  # an evaluation scores at most all of it
    lock = lock_run_dir(run_dir, drun)  # the first write: all checks passed. One writer per run directory.
    if lock is not None:
        hold.callback(lock.release)
    with contextlib.nullcontext() if drun is None else drun.main_first():
        if main:
            init_run_dir(run_dir, mcfg, cfg.to_dict(), resume=cfg.resume)
            if not cfg.resume:
                save_tokenizer(tokenizer, run_dir / "tokenizer")
    byte_lengths = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, mcfg, cfg.seq_len, arch_source).to(device)
    if main:
        save_arch(run_dir, model)  # --arch llama: the HF config (the arch is also in train_config.json)
    if cfg.init_from:
        # Weights only: this run keeps its own seed and a fresh optimizer.
        load_model_weights(latest_checkpoint(cfg.init_from), model)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing = True
    module = model if drun is None else drun.wrap(model)  # DDP / FSDP2: the optimizer sees the wrapped params
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    step, tokens, elapsed_before, horizon_fixed = 0, 0, 0.0, budget.total is None
    budget_set_horizon, horizons = False, []
    if main:
        metrics = MetricsLogger(run_dir, use_tensorboard=cfg.tensorboard)
    else:
        from ..distributed.run import NullMetrics

        metrics = NullMetrics()
    evaluated_at = -1
    if cfg.resume:
        # The checkpoint chosen above was verified (manifest, JSON, finite weights); the load checks the rest.
        if drun is None:
            state, sched_state = load_checkpoint(resume_from, model, optimizer, verify=False)
        else:
            state, sched_state = drun.load(resume_from, optimizer, verify=False)
        check_resume_state(resume_from, state)
        if sched_state:
            schedule.load_state_dict(sched_state)
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        horizon_fixed = state.get("horizon_fixed", True)
        budget_set_horizon = state.get("budget_set_horizon", False)
        horizons = list(state.get("horizons", []))
        metrics.truncate_after(step)
        # The run already evaluated at this step: ending here again must not log a second val line.
        if any(r.get("step") == step and "val_loss" in r for r in read_metrics(run_dir)):
            evaluated_at = step
        if plan.horizon is not None:
            schedule.max_steps = plan.horizon
            horizon_fixed, budget_set_horizon = True, plan.horizon < cfg.max_steps
            horizons.append({"step": step, "horizon": plan.horizon, "max_steps": cfg.max_steps,
                             "max_time": cfg.max_time})
            if main:
                record_resumed_limits(run_dir, cfg)
    else:
        metrics.truncate_after(-1)  # a fresh run in a reused directory starts a fresh metrics file
    step_fn = torch.compile(model) if cfg.compile else model
    if cfg.document_masking:
        step_fn = DocumentMaskedForward(step_fn, tokenizer.eos_id)  # training only; evaluation stays unmasked
    use_bf16 = cfg.dtype == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_session

    def trainer_state() -> dict[str, Any]:
        return {"step": step, "tokens": tokens, "elapsed": elapsed(), "horizon_fixed": horizon_fixed,
                "budget_set_horizon": budget_set_horizon, "data_position": step * cfg.grad_accum,
                "seed": cfg.seed, "max_steps": cfg.max_steps, "max_time": cfg.max_time, "horizons": horizons,
                **budget.state_dict()}

    def save() -> Path:
        try:
            if drun is not None:
                return drun.save(run_dir, step, optimizer, schedule.state_dict(), trainer_state(), cfg.keep_last)
            return save_checkpoint(run_dir, step, model, optimizer, schedule.state_dict(), trainer_state(),
                                   keep_last=cfg.keep_last)
        except NonFiniteError as exc:
            raise TrainingError(f"{exc}; stopping. The last good checkpoint is kept: {_last_good(run_dir)}") from exc

    n_params = sum(p.numel() for p in model.parameters())
    where = f"{device}"
    if drun is not None:
        where = (f"{drun.ctx.world_size} processes ({drun.kind}, {drun.ctx.dp_size} data x {drun.ctx.cp_size} "
                 f"chunk ranks) on {device.type}")
    # A time-limited run's length is unknown until its step time is measured: no total (and no ETA) until then.
    progress = Progress(cfg.progress if main else "none", total=schedule.max_steps if horizon_fixed else None,
                        initial=step)
    progress.write(f"run {run_dir}: {cfg.arch}, preset {cfg.preset!r}, {n_params:,} parameters, "
                   f"vocab {mcfg.vocab_size}, "
                   f"{len(train_data.tokens):,} train / {len(val_data.tokens):,} val tokens, "
                   f"{tokens_per_step:,} tokens per step on {where}")
    if plan is not None and plan.note:
        progress.write(plan.note)

    model.train()
    last_loss: float | None = None
    val_loss = val_bpb = None
    stopped_by = "max_steps"
    session_steps, recent_steps = 0, collections.deque(maxlen=RECENT_STEPS)
    probed_at = -math.inf  # elapsed time of the last timing of the end-of-run costs
    interruptible = drun is None  # a distributed evaluation is collective: every rank finishes it

    with StopFlag() as stop:

        def stopping() -> bool:
            return stop.signal is not None

        def run_eval(max_tokens: int | None = None) -> bool:
            """Evaluate (at most max_tokens) and log; False when a stop request abandoned it (nothing logged)."""
            nonlocal val_loss, val_bpb, evaluated_at
            eval_model = model if drun is None else drun.eval_module  # FSDP2: every rank runs the root module
            t0 = time.perf_counter()
            scored: dict[str, Any] = {}
            result = evaluate(eval_model, val_data, cfg.seq_len, cfg.eval_tokens if max_tokens is None else max_tokens,
                              byte_lengths, device, autocast, should_stop=stopping if interruptible else None,
                              info=scored)
            if result is None:
                return False
            if max_tokens is None:
                budget.measured("eval_s", time.perf_counter() - t0)
            val_loss, val_bpb = result
            evaluated_at = step
            record = {"step": step, "tokens": tokens, "elapsed": elapsed(), "val_loss": val_loss, "val_bpb": val_bpb,
                      **scored}  # what was scored: val_sample, val_targets, val_docs, val_docs_total, val_bytes
            if max_tokens is not None:
                record["eval_tokens"] = max_tokens  # a final evaluation shrunk to fit --max-time
            metrics.log(record)
            progress.write(f"step {step}: val_loss {val_loss:.4f} val_bpb {val_bpb:.4f}")
            return True

        def probe_end_of_run_costs(step_s: float | None, fresh: bool = False) -> None:
            """Time one evaluation batch and a few sampled tokens, so that the budget keeps room for the end.

            `step_s`: the step time at this moment (the machine's current speed). `fresh` re-times even after a
            complete evaluation was measured: the decision to stop uses costs measured under present conditions.
            """
            nonlocal probed_at
            probed_at = elapsed()
            if fresh:
                budget.eval_s = None
            if budget.eval_s is None:
                n = min(budget.eval_tokens, EVAL_BATCH * cfg.seq_len)
                eval_model = model if drun is None else drun.eval_module  # collective under FSDP2: every rank
                budget.measured("eval_token_s", measure_eval(
                    lambda k: evaluate(eval_model, val_data, cfg.seq_len, k, byte_lengths, device, autocast), n,
                    warmup_tokens=min(n, cfg.seq_len)), step_s)
            if cfg.sample_tokens and drun is None:  # a distributed run samples after training, on rank 0
                budget.measured("decode_s", measure_decode(
                    lambda k: sample_text(model, tokenizer, cfg.sample_prompt, k, seed=cfg.seed)), step_s)

        def final_eval_tokens() -> int | None:
            """None (the full evaluation), or the validation tokens that still fit in --max-time (one batch or more)."""
            fit = budget.eval_tokens_that_fit(elapsed())
            if drun is not None:
                fit = drun.from_main(fit)
            if fit >= budget.eval_tokens:
                return None
            n = min(budget.eval_tokens, max(fit // cfg.seq_len, EVAL_BATCH) * cfg.seq_len)  # whole windows
            progress.write(f"--max-time {cfg.max_time}: the final evaluation scores {n:,} of {budget.eval_tokens:,} "
                           "validation tokens, what the time left allows")
            return n

        while step < schedule.max_steps:
            out_of_time = budget.out_of_time(elapsed())
            if out_of_time and drun is None and elapsed() - probed_at > REPROBE_AFTER * budget.total:
                probe_end_of_run_costs(budget.step_s, fresh=True)  # stop on costs timed now, not minutes ago
                out_of_time = budget.out_of_time(elapsed())
            if out_of_time if drun is None else drun.from_main(int(out_of_time)):  # rank 0's clock decides
                stopped_by = "max_time"
                break
            lr = schedule.apply(optimizer, step)
            t0 = time.perf_counter()
            if drun is None:
                last_loss = _optimizer_step(step_fn, train_data, cfg, step, device, autocast, run_dir)
            else:
                last_loss = drun.backward(train_data, step, autocast)
                _check_finite(last_loss, step, run_dir)
            # grad_clip 0 = no clipping: an infinite threshold still measures the norm for the log
            grad_norm = _grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            session_steps += 1
            tokens += tokens_per_step
            step_seconds = time.perf_counter() - t0
            tok_s = tokens_per_step / step_seconds
            if session_steps > CALIBRATION_SKIP:  # the step alone (evaluations and saves are counted apart),
                recent_steps.append(step_seconds)  # recent ones: the machine's speed drifts
                budget.step_s = statistics.median(recent_steps)
            elif budget.step_s is None:  # a first, pessimistic figure (the first steps are the slowest)
                budget.step_s = step_seconds
            if budget.total is not None and session_steps == CALIBRATION_SKIP:
                probe_end_of_run_costs(step_seconds)
            if not horizon_fixed and session_steps >= CALIBRATION_MIN_STEPS and step >= cfg.warmup_steps:
                fit = step + max(1, budget.steps_that_fit(elapsed(), cfg.eval_every))
                if drun is not None:
                    fit = drun.from_main(fit)  # every rank keeps rank 0's horizon
                budget_set_horizon = fit < schedule.max_steps
                schedule.max_steps = max(min(schedule.max_steps, fit), cfg.warmup_steps + 1, step + 1)
                horizon_fixed = True
                progress.set_total(schedule.max_steps)
                progress.write(f"--max-time {cfg.max_time}: schedule horizon fixed at {schedule.max_steps} steps")
            elif not horizon_fixed and budget.step_s is not None:
                progress.set_total(min(schedule.max_steps, step + budget.steps_that_fit(elapsed(), cfg.eval_every)))
            progress.update(step, loss=last_loss, tok_s=tok_s, lr=lr, time_left=budget.left(elapsed()))
            if step % cfg.log_every == 0 or step == schedule.max_steps:
                metrics.log({"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                             "tokens": tokens, "tokens_per_s": tok_s, "elapsed": elapsed()})
                progress.plain(f"step {step}/{schedule.max_steps} loss {last_loss:.4f} lr {lr:.2e} "
                               f"grad {grad_norm:.2f} {tok_s:,.0f} tok/s elapsed {format_duration(elapsed())}")
            if (step % cfg.eval_every == 0 or step == schedule.max_steps) and not (interruptible and stopping()):
                run_eval()
            if step % cfg.save_every == 0:
                save()
            if stopping() if drun is None else drun.any(stopping()):
                stopped_by = "signal"
                break
        if stopped_by == "max_steps" and budget_set_horizon:
            stopped_by = "max_time"
        # A stop request skips the final evaluation (and abandons one in progress): save and leave.
        if stopped_by != "signal" and evaluated_at != step and not run_eval(final_eval_tokens()):
            stopped_by = "signal"
        path = save()
        progress.close()
        metrics.close()
        if drun is not None:
            model = drun.finish(path)  # rank 0: model.safetensors for generation / export, and the sample's model
            if not main:
                return TrainResult(run_dir, step, tokens, elapsed(), last_loss, val_loss, val_bpb, stopped_by,
                                   stop.signal)
        val = "" if val_loss is None else f"; val_loss {val_loss:.4f} val_bpb {val_bpb:.4f}"
        print(f"stopped by {stopped_by} at step {step} ({tokens:,} tokens, {format_duration(elapsed())}){val}; "
              f"checkpoint {path}", flush=True)
        if stopped_by != "signal":
            plot = plot_metrics(run_dir)
            if plot:
                print(f"curves: {plot}")
            if cfg.sample_tokens:
                deadline = None if budget.total is None else t_session + budget.total - elapsed_before
                text = sample_text(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed,
                                   deadline=deadline, should_stop=stopping)
                (run_dir / "sample.txt").write_text(text, encoding="utf-8")
                cut = " (cut short: --max-time ran out)" if deadline and time.perf_counter() >= deadline else ""
                print(f"sample ({run_dir / 'sample.txt'}){cut}:\n{text}")
    return TrainResult(run_dir, step, tokens, elapsed(), last_loss, val_loss, val_bpb, stopped_by, stop.signal)


def sample_text(model: MegalodonLM, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0,
                deadline: float | None = None, should_stop: Callable[[], bool] | None = None) -> str:
    """The end-of-training sample: prompt + up to max_new_tokens sampled tokens (temperature 0.8, top-k 40).

    Generation stops early at `deadline` (a time.perf_counter() value) or when `should_stop()` says so.
    """
    if isinstance(model, LlamaLM):
        return sample_llama_text(model, tokenizer, prompt, max_new_tokens, seed)
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    new: list[int] = []
    steps = stream_generate(model, [ids], max_new_tokens=max_new_tokens, temperature=0.8, top_k=40,
                            eos_token_id=tokenizer.eos_id, seed=seed)
    with contextlib.closing(steps):  # an early stop closes the generator, which restores the model's mode
        for tokens in steps:
            new.append(int(tokens[0]))
            if (deadline is not None and time.perf_counter() >= deadline) or (should_stop and should_stop()):
                break
    return prompt + tokenizer.decode([t for t in new if t != tokenizer.eos_id])


def _grad_norm(norm: torch.Tensor) -> float:
    # FSDP2 returns the total norm as a DTensor
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _report(line: str) -> None:
    print(f"megalodon-lm: {line}", file=sys.stderr, flush=True)


def _last_good(run_dir: Path) -> str:
    """The newest checkpoint that verifies (manifest, finite weights): what a resume would continue from."""
    good = newest_verified_checkpoint(run_dir)
    return str(good) if good is not None else "none saved yet"


def _check_finite(loss: float, step: int, run_dir: Path) -> None:
    if not math.isfinite(loss):
        raise TrainingError(f"non-finite loss ({loss}) at step {step + 1}; stopping. The last good checkpoint is "
                            f"kept: {_last_good(run_dir)}")


def _optimizer_step(step_fn, data, cfg: TrainConfig, step: int, device: torch.device, autocast, run_dir: Path) -> float:
    """Forward/backward of one optimizer step's micro-batches; returns the mean loss per scored token.

    The loss is normalised by the number of scored targets over all micro-batches (not per micro-batch),
    so gradient accumulation equals one big batch, and a batch whose targets are all masked (a prompt
    longer than the window) contributes nothing instead of a NaN.
    """
    batches = [sample_batch(data, cfg.batch_size, cfg.seq_len, step * cfg.grad_accum + micro, cfg.seed)
               for micro in range(cfg.grad_accum)]
    n_scored = max(1, sum(int((y != -100).sum()) for _, y in batches))
    total = 0.0
    for x, y in batches:
        with autocast():
            logits = step_fn(x.to(device)).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), ignore_index=-100,
                               reduction="sum") / n_scored
        if not torch.isfinite(loss.detach()):
            raise TrainingError(f"non-finite loss ({float(loss.detach())}) at step {step + 1}; stopping. The last "
                                f"good checkpoint is kept: {_last_good(run_dir)}")
        loss.backward()
        total += float(loss.detach())
    return total
