"""Megalodon vs Llama (HF transformers, SDPA) speed: training tokens/s and per-token decode latency.

    python benchmarks/model_speed.py                 # full run (slow on CPU: see benchmarks/README.md)
    python benchmarks/model_speed.py --quick         # smoke run, a minute or two on a laptop CPU

(a) training step = forward + backward (loss on random tokens, batch 1, fp32), tokens/s at each
    --train-lengths, median of --repeats timed steps after --warmup untimed ones, Megalodon and Llama
    interleaved step by step at each length. Peak memory of one step: on CUDA max_memory_allocated
    minus the memory allocated before the step; on CPU, in a fresh subprocess per (model, length), the
    peak RSS of one step (VmHWM, reset just before it) minus the RSS before it (an approximation:
    process-wide, includes gradients and allocator slack).
(b) decode: prefill a random context in --prefill-piece pieces under no_grad (state / KV cache carried),
    then --decode-warmup untimed and --decode-steps timed single-token steps (greedy next token);
    median latency per token, plus Megalodon StreamState bytes and Llama DynamicCache bytes.
(c) Llama: LlamaForCausalLM(attn_implementation="sdpa") built locally from a LlamaConfig with the same
    width/depth/vocab and an intermediate_size chosen to match Megalodon's parameter count (+-5%).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import torch
from _common import (
    RESULTS_DIR,
    current_rss_bytes,
    fill_defaults,
    fmt,
    fmt_bytes,
    fmt_len,
    max_rss_bytes,
    median,
    parse_lengths,
    pick_device,
    print_table,
    ratio,
    run_probe,
    save_json,
    set_threads,
    sync,
    system_info,
    time_call,
    trim_and_reset_peak_rss,
)

from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.generation.static_decode import StaticDecoder
from megalodon_lm.models.llama_baseline import LlamaLM, llama_config_for
from megalodon_lm.runtime import tune_cpu_allocator

TRAIN_COST_LIMIT = 1.3  # acceptance: train cost per token at the longest length / at 1K
DECODE_LAT_LIMIT = 1.15  # acceptance: decode latency at 64K / at 1K
# Performance targets (issue 5), Megalodon / Llama at matched parameters: (what, length, op, limit).
TARGETS = [("train tok/s ratio", 512, ">=", 0.8), ("train tok/s ratio", 2048, ">=", 1.3),
           ("train tok/s ratio", 8192, ">=", 3.0), ("train peak memory ratio", 16384, "<=", 0.5),
           ("prefill tok/s ratio", 16384, ">=", 2.0), ("decode latency ratio", 1024, "<=", 0.8)]
QUICK = dict(train_lengths="256,512", decode_contexts="256,512", llama_decode_contexts="256,512",
             repeats=2, warmup=1, decode_steps=8, decode_warmup=2, llama_max_train="512", ckpt_memory_lengths="512")
FULL = dict(train_lengths="512,1K,2K,8K,16K,32K", decode_contexts="1K,16K,64K", llama_decode_contexts="1K,16K",
            repeats=3, warmup=1, decode_steps=64, decode_warmup=8, llama_max_train="16K", ckpt_memory_lengths="16K")
LLAMA_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "max_position_embeddings")


# ---------------------------------------------------------------------------------------- models
def build_megalodon(preset: str, device: torch.device, seed: int) -> MegalodonLM:
    torch.manual_seed(seed)
    return MegalodonLM(MegalodonConfig.from_preset(preset)).to(device)


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def llama_config(mcfg: MegalodonConfig, target_params: int, max_positions: int) -> Any:
    """LlamaConfig with Megalodon's width, depth and vocab; intermediate_size fitted to the param count."""
    return llama_config_for(mcfg, max_positions, target_params)


def build_llama(lcfg: Any, device: torch.device, seed: int) -> Any:
    """The bare HF LlamaForCausalLM (sdpa) of the package's baseline wrapper."""
    torch.manual_seed(seed)
    return LlamaLM(lcfg).hf.to(device)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cache_kwarg(model: Any) -> str:
    """transformers >= 5.2x names the cache argument `cache`; older versions `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of the key/value tensors held by a transformers DynamicCache (any recent layout)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for name in ("key_cache", "value_cache"):  # transformers 4.x
        for t in getattr(cache, name, []):
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------- training
def random_ids(n: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g).to(device)


def train_step_fn(kind: str, model: Any, ids: torch.Tensor, targets: torch.Tensor):
    """Closure running one forward + backward (no optimizer step)."""
    if kind == "megalodon":
        def step() -> None:
            model(ids, targets=targets).loss.backward()
    else:
        def step() -> None:
            model(input_ids=ids, labels=targets, use_cache=False).loss.backward()
    return step


def cuda_peak_of(step, model: torch.nn.Module, device: torch.device) -> int:
    """Extra CUDA memory (bytes) allocated at the peak of one step, above what was allocated before."""
    model.zero_grad(set_to_none=True)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def memory_probe(args: argparse.Namespace) -> None:
    """Subprocess entry: peak RSS growth of one training step in a fresh process; prints one JSON line."""
    if not args.no_allocator_tuning:
        tune_cpu_allocator()
    device = torch.device("cpu")
    set_threads(args.threads)
    mcfg = MegalodonConfig.from_preset(args.preset)
    if args._probe in ("megalodon", "megalodon-ckpt"):
        model = build_megalodon(args.preset, device, args.seed)
        # Activation checkpointing per block: only block inputs are kept, each block is recomputed in backward.
        model.gradient_checkpointing = args._probe == "megalodon-ckpt"
    else:
        lcfg = llama_config(mcfg, mcfg.num_parameters(), max(8192, args._length + 1))
        model = build_llama(lcfg, device, args.seed)
    model.train()
    L = args._length
    ids = random_ids(L, mcfg.vocab_size, args.seed + 1, device)
    targets = random_ids(L, mcfg.vocab_size, args.seed + 2, device)
    kind = "llama" if args._probe == "llama" else "megalodon"
    step = train_step_fn(kind, model, ids, targets)
    # A 16-token step first absorbs one-time lazy initialisation (thread pools, kernels) outside the peak.
    train_step_fn(kind, model, ids[:, :16], targets[:, :16])()
    model.zero_grad(set_to_none=True)
    gc.collect()
    reset = trim_and_reset_peak_rss()
    before = current_rss_bytes() if reset else max_rss_bytes()
    step()
    after = max_rss_bytes()
    print(json.dumps({"peak_rss_bytes": after, "rss_before_bytes": before, "growth_bytes": after - before,
                      "peak_reset": reset}))


def bench_train(models: dict[str, Any], vocab: int, lengths: list[int], args: argparse.Namespace,
                device: torch.device) -> list[dict[str, Any]]:
    """Interleaved Megalodon/Llama training steps per length; returns one record per (model, length)."""
    records = []
    llama_max = parse_lengths(args.llama_max_train)[0]
    for L in lengths:
        ids = random_ids(L, vocab, args.seed + 1, device)
        targets = random_ids(L, vocab, args.seed + 2, device)
        # Llama's attention is quadratic: beyond --llama-max-train its steps take minutes on a CPU.
        steps = {k: train_step_fn(k, m, ids, targets) for k, m in models.items() if k != "llama" or L <= llama_max}
        active = {k: models[k] for k in steps}
        times: dict[str, list[float]] = {k: [] for k in active}
        for k, m in active.items():
            m.train()
            for _ in range(args.warmup):
                m.zero_grad(set_to_none=True)
                steps[k]()
        for _ in range(args.repeats):
            for k, m in active.items():
                m.zero_grad(set_to_none=True)
                times[k].append(time_call(steps[k], device))
        for k, m in active.items():
            t = median(times[k])
            rec = {"model": k, "length": L, "times_s": times[k], "median_s": t, "tokens_per_s": L / t}
            if device.type == "cuda":
                rec["peak_mem_bytes"] = cuda_peak_of(steps[k], m, device)
                rec["peak_mem_method"] = "cuda max_memory_allocated - allocated before step"
            m.zero_grad(set_to_none=True)
            records.append(rec)
            print(f"  train {k:9s} L={fmt_len(L):>5s}: {L / t:10.1f} tok/s  ({t * 1e3:.1f} ms/step)",
                  flush=True)
        del ids, targets, steps
        gc.collect()
    return records


CPU_MEM_METHOD = ("CPU: peak RSS (VmHWM, reset before the step) minus RSS before it, one train step in a "
                  "fresh subprocess after a 16-token warm-up step; includes gradients and allocator slack")


def add_cpu_memory(records: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fresh-subprocess RSS probes, run after all timings so they do not compete for the cores. Also probes
    Megalodon with activation checkpointing at --ckpt-memory-lengths (memory only); returns those records."""
    ckpt = [{"model": "megalodon-ckpt", "length": L} for L in parse_lengths(args.ckpt_memory_lengths)]
    # With the allocator tuned for reuse this process still holds the longest step's freed activations
    # (~13 GiB at 32K): hand them back first, or a probe of the same size finds no room (OOM on 24 GiB).
    gc.collect()
    trim_and_reset_peak_rss()
    for rec in records + ckpt:
        probe_args = ["--_probe", rec["model"], "--_length", str(rec["length"]), "--preset", args.preset,
                      "--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else [])
        probe_args += ["--no-allocator-tuning"] if args.no_allocator_tuning else []
        res = run_probe(Path(__file__), probe_args, timeout=args.memory_timeout)
        rec["peak_mem_method"] = CPU_MEM_METHOD
        if res and "growth_bytes" in res:
            rec["peak_mem_bytes"] = res["growth_bytes"]
            rec["peak_rss_bytes"] = res["peak_rss_bytes"]
            rec["peak_rss_reset_ok"] = res.get("peak_reset")
        else:
            rec["peak_mem_error"] = (res or {}).get("error", "no result")
            print(f"  memory probe {rec['model']} L={rec['length']} failed: {rec['peak_mem_error']}")
    return ckpt


# ---------------------------------------------------------------------------------------- decoding
@torch.no_grad()
def bench_decode(kind: str, model: Any, ctx: int, vocab: int, args: argparse.Namespace,
                 device: torch.device) -> dict[str, Any]:
    """Prefill `ctx` random tokens in pieces, then time single-token greedy decode steps."""
    model.eval()
    ids = random_ids(ctx, vocab, args.seed + 3, device)
    if kind in ("megalodon", "megalodon-compiled"):
        holder: dict[str, Any] = {"state": None}

        def forward(tok: torch.Tensor) -> torch.Tensor:
            out = model(tok, state=holder["state"], return_state=True)
            holder["state"] = out.state
            return out.logits[:, -1]

        def size() -> int:
            return holder["state"].nbytes()

        def size_max() -> int:
            """State bytes with a full partial chunk (chunk_size - 1 cached tokens): the largest it gets."""
            st, cfg = holder["state"], model.config
            cached = sum(t.numel() * t.element_size() for ls in st.layers for t in (ls.attn_k, ls.attn_v))
            el = st.layers[0].attn_k.element_size()
            per_token = cfg.num_heads * (cfg.head_dim + cfg.value_head_dim) * el
            full = cfg.num_layers * (cfg.chunk_size - 1) * per_token
            return st.nbytes() - cached + full
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        kw = {_cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}

        def forward(tok: torch.Tensor) -> torch.Tensor:
            return model(input_ids=tok, **kw).logits[:, -1]

        def size() -> int:
            return kv_cache_bytes(cache)

    # Untimed 16-token warm-up on a throw-away state/cache (first-call overheads in no_grad mode).
    if kind != "llama":
        model(ids[:, :16], return_state=True)
    else:
        model(input_ids=ids[:, :16], use_cache=False)
    sync(device)
    prefill_s = 0.0
    logits = None
    for start in range(0, ctx, args.prefill_piece):
        piece = ids[:, start:start + args.prefill_piece]
        box: dict[str, torch.Tensor] = {}
        prefill_s += time_call(lambda piece=piece, box=box: box.__setitem__("y", forward(piece)), device)
        logits = box["y"]
    state_at_ctx = size()
    if kind == "megalodon-compiled":
        # gpt-fast style: a fixed-shape step compiled once; the first warm-up step pays the compile.
        decoder = StaticDecoder(model, holder["state"], compile=True)

        def forward(tok: torch.Tensor) -> torch.Tensor:  # noqa: F811 - decode steps go through the decoder
            return decoder.step(tok.view(-1))

        def size() -> int:  # noqa: F811
            return decoder.stream_state().nbytes()

        args_warmup = max(1, args.decode_warmup)
    else:
        args_warmup = args.decode_warmup
    tok = logits.argmax(-1).view(1, 1)
    for _ in range(args_warmup):
        tok = forward(tok).argmax(-1).view(1, 1)
    lat = []
    for _ in range(args.decode_steps):
        box = {}
        lat.append(time_call(lambda tok=tok, box=box: box.__setitem__("y", forward(tok)), device))
        tok = box["y"].argmax(-1).view(1, 1)
    rec = {"model": kind, "context": ctx, "prefill_s": prefill_s, "prefill_tokens_per_s": ctx / prefill_s,
           "decode_latencies_s": lat, "decode_median_s": median(lat),
           "state_bytes_at_context": state_at_ctx, "state_bytes_after_decode": size(),
           "final_position": ctx + args_warmup + args.decode_steps}
    if kind != "llama":
        rec["state_bytes_max_in_chunk"] = size_max()
    print(f"  decode {kind:9s} ctx={fmt_len(ctx):>5s}: {rec['decode_median_s'] * 1e3:8.2f} ms/token  "
          f"state {fmt_bytes(rec['state_bytes_after_decode'])}  (prefill {ctx / prefill_s:.0f} tok/s)",
          flush=True)
    return rec


# ---------------------------------------------------------------------------------------- report
def _get(records: list[dict[str, Any]], model: str, key: str, value: int) -> dict[str, Any] | None:
    return next((r for r in records if r["model"] == model and r[key] == value), None)


def acceptance(name: str, lo: int, hi: int, value: float | None, limit: float,
               wanted: tuple[int, int]) -> dict[str, Any]:
    """Print and return one acceptance check (value <= limit), flagging non-acceptance lengths."""
    verdict = "n/a" if value is None else ("PASS" if value <= limit else "FAIL")
    note = "" if (lo, hi) == wanted else (f"  (indicative only: acceptance is defined at "
                                           f"{fmt_len(wanted[0])} -> {fmt_len(wanted[1])})")
    print(f"  {name} {fmt_len(hi)} / {fmt_len(lo)}: {fmt(value, '.3f')}  (limit <= {limit})  {verdict}{note}")
    return {"name": name, "low": lo, "high": hi, "value": value, "limit": limit, "verdict": verdict,
            "at_acceptance_lengths": (lo, hi) == wanted}


def report(res: dict[str, Any], has_llama: bool) -> None:
    tr, dec = res["train"], res["decode"]
    mem_note = res["memory_method"]
    rows = []
    for L in res["config"]["train_lengths"]:
        m, ll = _get(tr, "megalodon", "length", L), _get(tr, "llama", "length", L)
        ck = _get(tr, "megalodon-ckpt", "length", L)
        rows.append([fmt_len(L), fmt(m and m["tokens_per_s"], ".1f"), fmt(ll and ll["tokens_per_s"], ".1f"),
                     fmt(ratio(m and m["tokens_per_s"], ll and ll["tokens_per_s"]), ".2f"),
                     fmt_bytes(m and m.get("peak_mem_bytes")), fmt_bytes(ck and ck.get("peak_mem_bytes")),
                     fmt_bytes(ll and ll.get("peak_mem_bytes")),
                     fmt(ratio(m and m.get("peak_mem_bytes"), ll and ll.get("peak_mem_bytes")), ".2f")])
    print_table(["L", "Mega tok/s", "Llama tok/s", "Mega/Llama", "Mega mem", "Mega ckpt mem", "Llama mem",
                 "mem Mega/Llama"], rows,
                f"(a) training step (fwd+bwd, batch 1, fp32), median of {res['config']['repeats']}; "
                f"mem = {mem_note}; ckpt = with activation checkpointing per block")
    rows = []
    for ctx in res["config"]["decode_contexts"]:
        m, ll = _get(dec, "megalodon", "context", ctx), _get(dec, "llama", "context", ctx)
        mc = _get(dec, "megalodon-compiled", "context", ctx)
        lat_m, lat_l = m and m["decode_median_s"], ll and ll["decode_median_s"]
        lat_c = mc and mc["decode_median_s"]
        rows.append([fmt_len(ctx), fmt(lat_m and lat_m * 1e3, ".2f"), fmt(lat_c and lat_c * 1e3, ".2f"),
                     fmt(lat_l and lat_l * 1e3, ".2f") if ll else ("skipped" if has_llama else "-"),
                     fmt(ratio(lat_c or lat_m, lat_l), ".2f"), fmt_bytes(m and m["state_bytes_after_decode"]),
                     fmt_bytes(m and m["state_bytes_max_in_chunk"]),
                     fmt_bytes(ll and ll["state_bytes_after_decode"]),
                     fmt(m and m["prefill_tokens_per_s"], ".0f"),
                     fmt(ll and ll["prefill_tokens_per_s"], ".0f")])
    print_table(["context", "Mega ms/tok", "Mega compiled", "Llama ms/tok", "best Mega/Llama", "Mega state",
                 "Mega state max", "Llama KV", "Mega prefill tok/s", "Llama prefill tok/s"], rows,
                f"(b) decode latency per token, median of {res['config']['decode_steps']} steps after "
                f"{res['config']['decode_warmup']} warm-up steps; compiled = StaticDecoder(compile=True); "
                f"state/KV bytes after the timed steps (state max: with a full partial attention chunk cached)")
    for s in res["skipped"]:
        print(f"  note: {s}")


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue-5 targets that this run's lengths cover: value, limit, PASS/FAIL."""
    tr, dec = res["train"], res["decode"]
    out = []
    for what, L, op, limit in TARGETS:
        if what == "train tok/s ratio":
            m, ll = _get(tr, "megalodon", "length", L), _get(tr, "llama", "length", L)
            value = ratio(m and m["tokens_per_s"], ll and ll["tokens_per_s"])
        elif what == "train peak memory ratio":
            m, ll = _get(tr, "megalodon", "length", L), _get(tr, "llama", "length", L)
            value = ratio(m and m.get("peak_mem_bytes"), ll and ll.get("peak_mem_bytes"))
            ck = _get(tr, "megalodon-ckpt", "length", L)
            ck_value = ratio(ck and ck.get("peak_mem_bytes"), ll and ll.get("peak_mem_bytes"))
            if ck_value is not None:
                out.append(_target(what + " (Megalodon with activation checkpointing)", L, op, limit, ck_value))
        elif what == "prefill tok/s ratio":
            m, ll = _get(dec, "megalodon", "context", L), _get(dec, "llama", "context", L)
            value = ratio(m and m["prefill_tokens_per_s"], ll and ll["prefill_tokens_per_s"])
        else:
            m = _get(dec, "megalodon-compiled", "context", L) or _get(dec, "megalodon", "context", L)
            ll = _get(dec, "llama", "context", L)
            value = ratio(m and m["decode_median_s"], ll and ll["decode_median_s"])
        out.append(_target(what, L, op, limit, value))
    return out


def _target(what: str, L: int, op: str, limit: float, value: float | None) -> dict[str, Any]:
    ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
    verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
    print(f"  {what} at {fmt_len(L)}: {fmt(value, '.2f')} (target {op} {limit})  {verdict}")
    return {"name": what, "length": L, "value": value, "op": op, "limit": limit, "verdict": verdict}


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all available cores)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--train-lengths", default=None, help=f"default {FULL['train_lengths']}")
    p.add_argument("--decode-contexts", default=None, help=f"Megalodon, default {FULL['decode_contexts']}")
    p.add_argument("--llama-decode-contexts", default=None, help=f"default {FULL['llama_decode_contexts']}")
    p.add_argument("--repeats", type=int, default=None, help="timed training steps per length (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps per length (default 1)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (default 64)")
    p.add_argument("--decode-warmup", type=int, default=None, help="untimed decode steps (default 8)")
    p.add_argument("--prefill-piece", type=int, default=4096, help="tokens per prefill forward")
    p.add_argument("--no-llama", action="store_true", help="skip the Llama baseline")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--memory-timeout", type=float, default=1800.0, help="seconds per CPU memory probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-allocator-tuning", action="store_true",
                   help="keep glibc's default of returning freed memory to the OS (see megalodon_lm.runtime)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--out", default=str(RESULTS_DIR / "model_speed.json"))
    p.add_argument("--llama-max-train", default=None, help="longest Llama training length (default 16K)")
    p.add_argument("--ckpt-memory-lengths", default=None,
                   help="lengths at which Megalodon's memory is also probed with activation checkpointing (16K)")
    p.add_argument("--no-compiled-decode", action="store_true",
                   help="skip Megalodon's torch.compile'd static decode step (its first call compiles: ~1 min)")
    p.add_argument("--_probe", default=None, choices=["megalodon", "megalodon-ckpt", "llama"],
                   help=argparse.SUPPRESS)
    p.add_argument("--_length", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return fill_defaults(args, QUICK if args.quick else FULL)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args._probe:
        memory_probe(args)
        return {}
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    # Applies to both models alike (same process): see megalodon_lm.runtime for why.
    allocator_tuned = False if args.no_allocator_tuning else tune_cpu_allocator()
    print(f"glibc allocator tuned for reuse: {allocator_tuned}")
    train_lengths = parse_lengths(args.train_lengths)
    contexts = parse_lengths(args.decode_contexts)
    llama_contexts = parse_lengths(args.llama_decode_contexts)
    skipped: list[str] = []

    mega = build_megalodon(args.preset, device, args.seed)
    mcfg = mega.config
    models: dict[str, Any] = {"megalodon": mega}
    counts = {"megalodon": n_params(mega)}
    lcfg = None
    has_llama = not args.no_llama and have_transformers()
    if not args.no_llama and not has_llama:
        skipped.append("transformers is not installed: Llama baseline skipped")
    if has_llama:
        need = max(contexts + llama_contexts + train_lengths) + args.decode_warmup + args.decode_steps + 16
        lcfg = llama_config(mcfg, counts["megalodon"], max(131072, need))
        models["llama"] = build_llama(lcfg, device, args.seed)
        counts["llama"] = n_params(models["llama"])
        rel = counts["llama"] / counts["megalodon"]
        assert abs(rel - 1) <= 0.05, f"parameter counts differ by more than 5%: {counts}"
    print(f"device {device}, threads {threads}, torch {torch.__version__}")
    print(f"Megalodon preset {args.preset!r}: {counts['megalodon']:,} params")
    if lcfg is not None:
        print(f"Llama (sdpa) layers={lcfg.num_hidden_layers} hidden={lcfg.hidden_size} "
              f"heads={lcfg.num_attention_heads} intermediate={lcfg.intermediate_size} "
              f"vocab={lcfg.vocab_size} tied={lcfg.tie_word_embeddings}: "
              f"{counts['llama']:,} params ({100 * (counts['llama'] / counts['megalodon'] - 1):+.2f}%, "
              f"within +-5%: OK)")

    print("\n(a) training", flush=True)
    train = bench_train(models, mcfg.vocab_size, train_lengths, args, device)
    if args.no_memory:
        mem_method = "not measured (--no-memory)"
    elif device.type == "cuda":
        mem_method = "CUDA max_memory_allocated above the pre-step allocation"
    else:
        mem_method = "CPU peak-RSS growth of one step in a fresh process (approx.)"
        print("  measuring CPU peak memory in fresh subprocesses ...", flush=True)
        train += add_cpu_memory(train, args)

    print("\n(b) decode", flush=True)
    decode = []
    for ctx in sorted(set(contexts) | set(llama_contexts if has_llama else [])):
        if ctx in contexts:
            decode.append(bench_decode("megalodon", mega, ctx, mcfg.vocab_size, args, device))
            if not args.no_compiled_decode:
                decode.append(bench_decode("megalodon-compiled", mega, ctx, mcfg.vocab_size, args, device))
        if has_llama and ctx in llama_contexts:
            decode.append(bench_decode("llama", models["llama"], ctx, mcfg.vocab_size, args, device))
        elif has_llama:
            skipped.append(f"Llama decode at {fmt_len(ctx)} skipped (not in --llama-decode-contexts)")
        gc.collect()
    all_ctx = sorted({r["context"] for r in decode})
    if len({c % mcfg.chunk_size for c in contexts}) > 1:
        skipped.append(f"decode contexts are not all congruent mod chunk_size={mcfg.chunk_size}: Megalodon's "
                       "timed steps see different in-chunk attention cache lengths across contexts")

    res: dict[str, Any] = {
        "system": system_info(device, threads),
        "config": {"preset": args.preset, "megalodon_config": mcfg.to_dict(),
                   "llama_config": None if lcfg is None else {k: getattr(lcfg, k) for k in LLAMA_FIELDS},
                   "param_counts": counts, "train_lengths": train_lengths, "decode_contexts": all_ctx,
                   "megalodon_decode_contexts": contexts,
                   "llama_decode_contexts": llama_contexts if has_llama else [],
                   "repeats": args.repeats, "warmup": args.warmup, "decode_steps": args.decode_steps,
                   "decode_warmup": args.decode_warmup, "prefill_piece": args.prefill_piece,
                   "quick": args.quick, "allocator_tuned": allocator_tuned,
                   "llama_max_train": parse_lengths(args.llama_max_train)[0],
                   "dtype": "float32", "batch_size": 1},
        "memory_method": mem_method, "train": train, "decode": decode, "skipped": skipped,
    }
    report(res, has_llama)
    print("\nPerformance targets (issue 5; Megalodon / Llama, matched parameters, same process)")
    res["targets"] = targets(res)

    print("\nMegalodon scaling (project acceptance)")
    acc = []
    mt = sorted((r for r in train if r["model"] == "megalodon"), key=lambda r: r["length"])
    if len(mt) >= 2:
        lo, hi = mt[0], mt[-1]
        lo = next((r for r in mt if r["length"] == 1024), lo)
        cost = ratio(hi["median_s"] / hi["length"], lo["median_s"] / lo["length"])
        acc.append(acceptance("train cost per token", lo["length"], hi["length"], cost, TRAIN_COST_LIMIT,
                              (1024, 32768)))
    md = sorted((r for r in decode if r["model"] == "megalodon-compiled"), key=lambda r: r["context"]) or sorted(
        (r for r in decode if r["model"] == "megalodon"), key=lambda r: r["context"])
    if len(md) >= 2:
        lo, hi = md[0], md[-1]
        acc.append(acceptance("decode latency", lo["context"], hi["context"],
                              ratio(hi["decode_median_s"], lo["decode_median_s"]), DECODE_LAT_LIMIT,
                              (1024, 65536)))
    res["acceptance"] = acc
    out = save_json(args.out, res)
    print(f"\nresults written to {out}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
