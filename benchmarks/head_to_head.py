"""Head-to-head: Megalodon against a parameter-matched Llama (HF, sdpa), same data, tokens, batch and schedule.

    python benchmarks/head_to_head.py --setting cpu --out runs/h2h-cpu     # ~25 min on 2 idle cores
    python benchmarks/head_to_head.py --setting smoke --out /tmp/h2h       # a couple of minutes, checks the harness
    python benchmarks/head_to_head.py --setting gpu --out runs/h2h-gpu     # one GPU (sized, see docs/results.md)

Stages (a progress line each), every one fixed in steps/tokens and seeded, so token-indexed numbers reproduce:
 1. learning-rate check: a short run (full warm-up + cosine) per model and candidate lr; the lower val BPB wins.
 2. main training of both with `megalodon-lm train` (`--arch megalodon|llama`) in a subprocess each (peak
    memory of that process), val BPB on fixed slices of the validation books every eval_every steps.
 3. val BPB on the first `final_bytes` of each validation book at the training length (non-overlapping windows).
 4. BPB vs context (docs/evaluation.md §3): the same scored bytes at every context; Megalodon also streamed over
    the whole prefix; Llama with full attention over C and with a sliding window at its training length.
 5. passkey (§4.1, trained variant): fine-tune copies of both models, key in an earlier chunk than the question.
 6. MQAR (§4.2): small models of both archs trained from scratch, queries beyond the attention chunk.
`--only mqar --resume` reruns stage 6 alone into an existing OUT (its models are trained from scratch there, so
nothing else is needed) and rewrites results.json/.md: for sizing the probe without repeating an hour of training.
Writes OUT/results.json, OUT/results.md and PNG plots. Data: `--books DIR`, the 26 novels of benchmarks/books.tsv
(`python benchmarks/fetch_books.py` downloads them into data/books, the default) or any folder of .txt files
(split as benchmarks/_books.py says).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _books import book_slug, book_split, default_books_dir, read_book
from _common import system_info
from _h2h_report import equal_time, markdown, plots, read_curve

DEFAULT_BOOKS = default_books_dir()  # data/books (fetch_books.py's output), else ../shared/data/books; or None
NO_BOOKS = ("no books directory: run `python benchmarks/fetch_books.py` (downloads the 26 public-domain novels "
            "into data/books) or pass --books DIR (any folder of .txt files)")
ARCHS = ("megalodon", "llama")
# Setting fields that may be absent: Llama's full attention only up to llama_full_max (the sliding window
# beyond); resets = Megalodon's reset ablation, [{"parts": [...], "every": "chunk" | N}, ...]; parallel_train =
# train both models at once.
OPTIONAL_KEYS = ("llama_full_max", "resets", "parallel_train")

SMOKE_MODEL = dict(num_layers=2, model_dim=64, z_dim=32, value_dim=128, num_heads=1, ffn_hidden_dim=128,
                   chunk_size=32, norm_num_groups=8)
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        device="cpu", threads=2, dtype="fp32", preset="nano", model=SMOKE_MODEL, train_books=2, seq_len=64,
        batch_size=4, steps=12, warmup=2, eval_every=6, lr_grid=[2e-3, 4e-3], lr_check_steps=4,
        curve_bytes=2048, final_bytes=4096, ctx_doc_bytes=4096, ctx_score_tokens=128, contexts=[32, 64, 128],
        llama_full_max=64, resets=[dict(parts=["both"], every=64)],
        passkey=dict(length=128, test_lengths=[128, 256], steps=4, batch=4, trials=8, lr_scale=0.5),
        mqar=dict(model=SMOKE_MODEL, seq_len=64, num_pairs=4, query_start=32, steps=5, batch=8, lr=3e-3,
                  n_eval=32)),
    "cpu": dict(
        # the default preset 3M (the JAX port's shape: 4 layers, width 256, 1 head, SwiGLU, CEMA dimension 16,
        # chunk 128; training length = 4 chunks), chosen by the preset comparison in docs/results.md (issue 16)
        device="cpu", threads=2, dtype="fp32", preset="3M", model={}, train_books=20, seq_len=512,
        batch_size=8, steps=720, warmup=60, eval_every=120, lr_grid=[2e-3, 4e-3], lr_check_steps=30,
        curve_bytes=8192, final_bytes=65536, ctx_doc_bytes=65536, ctx_score_tokens=2048,
        contexts=[128, 256, 512, 1024, 2048, 4096, 8192],
        passkey=dict(length=512, test_lengths=[512, 1024, 2048], steps=40, batch=8, trials=32, lr_scale=0.5),
        mqar=dict(model=dict(num_layers=2, model_dim=128, z_dim=64, value_dim=256, num_heads=2, ffn_hidden_dim=256,
                             chunk_size=128, norm_num_groups=16),
                  seq_len=256, num_pairs=16, query_start=128, steps=150, batch=32, lr=3e-3, n_eval=256)),
    "gpu": dict(
        device="cuda", threads=None, dtype="bf16", preset="200M", model={}, train_books=20, seq_len=8192,
        batch_size=4, steps=3000, warmup=300, eval_every=250, lr_grid=[6e-4, 1.2e-3, 2.4e-3], lr_check_steps=300,
        curve_bytes=65536, final_bytes=1 << 20, ctx_doc_bytes=1 << 20, ctx_score_tokens=4096,
        contexts=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072],
        passkey=dict(length=8192, test_lengths=[8192, 16384, 32768, 65536], steps=300, batch=8, trials=64,
                     lr_scale=0.5),
        mqar=dict(model=dict(num_layers=2, model_dim=256, z_dim=128, value_dim=512, num_heads=2, ffn_hidden_dim=512,
                             chunk_size=256, norm_num_groups=32),
                  seq_len=1024, num_pairs=64, query_start=256, steps=2000, batch=64, lr=3e-3, n_eval=1024)),
    "long": dict(
        # T = 4096 = 16 Megalodon chunks of 256 (CEMA dimension 16): context beyond the chunk is only reachable
        # through CEMA and the TimestepNorm statistics; Llama sees all of T. Measured on 2 idle cores with 240
        # steps (docs/results.md): training 23 min (Llama 2/3 of it), evaluation 19 min, probes 45 min
        # (the sized MQAR below alone: 19 min).
        device="cpu", threads=2, dtype="fp32", preset="mini", model=dict(chunk_size=256, cema_ndim=16),
        train_books=20, seq_len=4096, batch_size=2, steps=360, warmup=30, eval_every=60, lr_grid=[2e-3, 4e-3],
        lr_check_steps=60, curve_bytes=16384, final_bytes=65536, ctx_doc_bytes=262144, ctx_score_tokens=4096,
        contexts=[256, 512, 1024, 2048, 4096, 16384, 65536], llama_full_max=4096,
        resets=[dict(parts=["cema", "norm", "both"], every="chunk"), dict(parts=["both"], every=4096)],
        # probes: keys/queries at distances inside and beyond Megalodon's chunk, within Llama's training length
        passkey=dict(length=1024, test_lengths=[1024, 2048, 4096], steps=300, batch=8, trials=32, lr_scale=0.5,
                     distances=[64, 128, 256, 512, 960]),
        # MQAR sized so that full-attention Llama solves it (docs/results.md): rows of 1..8 pairs in training,
        # every query in a later Megalodon chunk than all pairs, and the one-chunk Megalodon as a control
        mqar=dict(model=dict(num_layers=2, model_dim=128, z_dim=64, value_dim=256, num_heads=2, ffn_hidden_dim=256,
                             chunk_size=16, norm_num_groups=16),
                  seq_len=32, num_pairs=8, min_pairs=1, query_start=16, steps=4000, batch=64, lr=1e-3, n_eval=256,
                  distance_edges=[0, 8, 16, 24, 32], full_chunk_control=True)),
}


# ---------------------------------------------------------------------------------------------- data
def write_slices(books: list[Path], n_bytes: int, directory: Path) -> list[Path]:
    """The first n_bytes of each book as plain files (validation slices the trainer can read)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for book in books:
        p = directory / f"{book_slug(book)}.txt"
        p.write_bytes(read_book(book, n_bytes))
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------- training
def train_options(cfg: dict[str, Any], arch: str, lr: float, steps: int, out: Path, data: list[Path],
                  val: list[Path], cache: Path) -> dict[str, Any]:
    eval_every = min(cfg["eval_every"], steps)
    # A shorter run (the lr check) warms up over the same fraction of its steps and then decays (cosine) like
    # the main run, instead of spending all its steps in warm-up, which would favour the larger rate.
    warmup = max(1, round(cfg["warmup"] * steps / cfg["steps"]))
    return dict(arch=arch, preset=cfg["preset"], model=dict(cfg["model"]), data=[str(p) for p in data],
                val_data=[str(p) for p in val], tokenizer="byte", seq_len=cfg["seq_len"], batch_size=cfg["batch_size"],
                lr=lr, warmup_steps=warmup, max_steps=steps, max_time="none", eval_every=eval_every,
                eval_tokens=10**9, save_every=steps, keep_last=1, log_every=math.gcd(eval_every, 10), sample_tokens=0,
                out=str(out), cache_dir=str(cache), seed=0, device=cfg["device"], dtype=cfg["dtype"],
                threads=cfg["threads"], progress="none", tensorboard=False)


def run_worker(options: dict[str, Any], log: Path) -> dict[str, Any]:
    """`megalodon_lm.train(**options)` in a fresh process; returns its result with the process's peak memory."""
    spec = log.with_suffix(".json")
    done = spec.with_suffix(".result.json")
    if done.is_file() and spec.is_file() and json.loads(spec.read_text()) == options:
        return json.loads(done.read_text())  # --resume: this run already finished with the same options
    spec.write_text(json.dumps(options))
    env = dict(os.environ)
    if options.get("threads"):
        env.update(OMP_NUM_THREADS=str(options["threads"]), MKL_NUM_THREADS=str(options["threads"]))
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, __file__, "--_worker", str(spec)], stdout=fh, stderr=subprocess.STDOUT,
                              env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return json.loads(spec.with_suffix(".result.json").read_text())


def _worker(spec_path: str) -> int:
    import megalodon_lm

    spec = Path(spec_path)
    options = json.loads(spec.read_text())
    if options["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = megalodon_lm.train(None, **options)
    peak = (torch.cuda.max_memory_allocated() if options["device"] == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    spec.with_suffix(".result.json").write_text(json.dumps(
        {"step": result.step, "tokens": result.tokens, "elapsed": result.elapsed, "val_bpb": result.val_bpb,
         "peak_memory_bytes": int(peak), "peak_memory_kind": "cuda max_memory_allocated" if options["device"] == "cuda"
         else "process peak RSS"}))
    return 0


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def windowed_bpb(model: torch.nn.Module, docs: list[bytes], seq_len: int, device: torch.device,
                 batch: int = 8) -> dict[str, Any]:
    """BPB of every target of each document, in non-overlapping windows of seq_len (as the trainer's evaluation)."""
    model.eval()
    nll, n = 0.0, 0
    windows = []
    for d in docs:
        ids = torch.tensor(list(d), dtype=torch.long)
        windows += [ids[s:s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]
    full = [w for w in windows if len(w) == seq_len + 1]
    groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[w] for w in windows if len(w) != seq_len + 1]
    for g in groups:
        w = torch.stack(g).to(device)
        logits = model(w[:, :-1]).logits
        nll += float(F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum"))
        n += w[:, 1:].numel()
    return {"bpb": nll / math.log(2) / n, "n_bytes": n}  # byte tokenizer: one byte per target


def reset_stage(model: torch.nn.Module, tok: Any, docs: list[bytes], cfg: dict[str, Any], log) -> list[dict[str, Any]]:
    """Megalodon's whole-prefix stream with CEMA / TimestepNorm state reset periodically (same scored bytes)."""
    from megalodon_lm.evals.ppl import bpb_vs_context

    rows = []
    for spec in cfg.get("resets", []):
        every = None if spec["every"] == "chunk" else int(spec["every"])
        r = bpb_vs_context(model, tok, docs, [], cfg["ctx_score_tokens"], resets=spec["parts"], reset_every=every)
        rows += r["results"]
        log("reset ablation: " + ", ".join(f"{x['label']} {x['bpb']:.4f}" for x in r["results"]))
    return rows


def passkey_stage(models: dict[str, Any], cfg: dict[str, Any], lrs: dict[str, float], train_pool: torch.Tensor,
                  val_pool: torch.Tensor, tok: Any, device: torch.device, log) -> dict[str, Any]:
    from megalodon_lm.evals.passkey import evaluate_passkey, passkey_batch
    from megalodon_lm.evals.probe_training import train_probe

    pk = cfg["passkey"]
    chunk = models["megalodon"].config.chunk_size
    out: dict[str, Any] = {"steps": pk["steps"], "train_length": pk["length"], "chunk": chunk, "trials": pk["trials"]}
    for arch, model in models.items():
        tuned = copy.deepcopy(model).to(device)
        torch.manual_seed(0)
        stats = train_probe(tuned, lambda s: passkey_batch(train_pool, tok, pk["batch"], pk["length"], 0, s, chunk),
                            pk["steps"], lrs[arch] * pk["lr_scale"], warmup=max(1, pk["steps"] // 10), log=log)
        out[arch] = [evaluate_passkey(tuned, val_pool, tok, length, pk["trials"], seed=1, chunk=chunk)
                     for length in pk["test_lengths"]]
        out[arch + "_train"] = stats
        out[arch + "_by_distance"] = [  # key line d tokens before the question, at the training length
            evaluate_passkey(tuned, val_pool, tok, pk["length"], pk["trials"], seed=2, distance=d)
            for d in pk.get("distances", [])]
        log(f"  passkey {arch}: " + ", ".join(f"{r['length']}: acc {r['accuracy']:.2f} bits/digit "
                                              f"{r['bits_per_digit']:.2f}" for r in out[arch]))
        del tuned
    return out


def mqar_stage(cfg: dict[str, Any], vocab: int, device: torch.device, log) -> dict[str, Any]:
    from megalodon_lm.evals.mqar import evaluate_mqar, mqar_batch
    from megalodon_lm.evals.probe_training import train_probe
    from megalodon_lm.models import MegalodonConfig
    from megalodon_lm.models.llama_baseline import build_model

    mq = cfg["mqar"]
    mcfg = MegalodonConfig.from_preset("nano", **{**mq["model"], "vocab_size": vocab})
    out: dict[str, Any] = {k: mq[k] for k in ("seq_len", "num_pairs", "query_start", "steps")}
    out["min_pairs"], out["chunk"] = mq.get("min_pairs"), mcfg.chunk_size
    models = [(arch, arch, mcfg) for arch in ARCHS]
    if mq.get("full_chunk_control"):  # the same Megalodon with one chunk over the whole sequence: its attention
        full = MegalodonConfig.from_dict({**mcfg.to_dict(), "chunk_size": mq["seq_len"]})  # sees every key
        models.append(("megalodon_full", "megalodon", full))
    for name, arch, model_cfg in models:
        torch.manual_seed(0)
        model = build_model(arch, model_cfg, mq["seq_len"]).to(device)
        stats = train_probe(model, lambda s: mqar_batch(mq["batch"], mq["seq_len"], mq["num_pairs"], vocab, 0, s,
                                                        mq["query_start"], mq.get("min_pairs")),
                            mq["steps"], mq["lr"], log=log)
        res = evaluate_mqar(model, mq["seq_len"], mq["num_pairs"], vocab, mq["n_eval"], seed=1,
                            query_start=mq["query_start"], distance_edges=mq.get("distance_edges"))
        out[name] = {**res, "params": sum(p.numel() for p in model.parameters()), "train": stats,
                     "chunk": model_cfg.chunk_size if arch == "megalodon" else None}
        log(f"  mqar {name}: accuracy {res['accuracy']:.3f}")
    return out


# ---------------------------------------------------------------------------------------------- driver
def run(setting: str, out: Path, books_dir: Path, cache: Path | None,
        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from megalodon_lm.data.dataset import build_corpora
    from megalodon_lm.data.tokenizer import ByteTokenizer
    from megalodon_lm.evals.ppl import bpb_vs_context
    from megalodon_lm.training.checkpoint import load_run

    cfg = {**SETTINGS[setting], **(overrides or {})}
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    device = torch.device(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    split = book_split(books_dir)
    train_books = split["train"][:cfg["train_books"]]
    curve_val = write_slices(split["validation"], cfg["curve_bytes"], out / "data" / "val-curve")
    cache = cache or out / "token-cache"
    res: dict[str, Any] = {"setting": setting, "config": cfg, "overrides": overrides or {},
                           "system": system_info(device, torch.get_num_threads()),
                           "train_books": [p.name for p in train_books],
                           "val_books": [p.name for p in split["validation"]]}

    # 1. learning-rate check
    res["lr_check"] = {"grid": cfg["lr_grid"], "steps": cfg["lr_check_steps"], "bpb": {}}
    lrs = {}
    for arch in ARCHS:
        scores = {}
        for lr in cfg["lr_grid"] if len(cfg["lr_grid"]) > 1 else []:  # one candidate: nothing to check
            run_dir = out / "runs" / f"lr-check-{arch}-{lr:g}"
            r = run_worker(train_options(cfg, arch, lr, cfg["lr_check_steps"], run_dir, train_books, curve_val, cache),
                           out / "logs" / f"lr-check-{arch}-{lr:g}.log")
            scores[str(lr)] = r["val_bpb"]
            log(f"lr check {arch} lr {lr:g}: val_bpb {r['val_bpb']:.4f} ({r['elapsed']:.0f} s)")
        res["lr_check"]["bpb"][arch] = scores
        lrs[arch] = min(cfg["lr_grid"], key=lambda lr, s=scores: (s.get(str(lr), 0.0), lr))

    # 2. main training
    res["train"], res["curves"], models = {}, {}, {}

    def train(arch: str) -> dict[str, Any]:
        return run_worker(train_options(cfg, arch, lrs[arch], cfg["steps"], out / "runs" / arch, train_books,
                                        curve_val, cache), out / "logs" / f"train-{arch}.log")

    # parallel_train: both processes at once (on a shared machine each gets its own share of the cores; their
    # tokens/s then measure the two under the same contention, not each alone)
    with ThreadPoolExecutor(len(ARCHS) if cfg.get("parallel_train") else 1) as pool:
        trained = dict(zip(ARCHS, pool.map(train, ARCHS), strict=True))
    for arch in ARCHS:
        run_dir, r = out / "runs" / arch, trained[arch]
        curve = read_curve(run_dir / "metrics.jsonl")
        train_time = curve[-1]["train_time"]
        model = models[arch] = load_run(run_dir, device)[0]
        res["curves"][arch] = curve
        res["train"][arch] = {**r, "lr": lrs[arch], "train_time": train_time, "tokens_per_s": r["tokens"] / train_time,
                              "params": sum(p.numel() for p in model.parameters()), "run_dir": str(run_dir)}
        log(f"train {arch}: {r['tokens']:,} tokens, val_bpb {r['val_bpb']:.4f}, {r['tokens'] / train_time:,.0f} tok/s, "
            f"peak {r['peak_memory_bytes'] / 2**20:,.0f} MiB")
    res["equal_time"] = equal_time(res["curves"])
    tok = ByteTokenizer()

    # 3. BPB on the first final_bytes of each validation book, training-length windows
    final_docs = [read_book(p, cfg["final_bytes"]) for p in split["validation"]]
    res["final_bpb"] = {a: windowed_bpb(m, final_docs, cfg["seq_len"], device) for a, m in models.items()}
    log("final BPB: " + ", ".join(f"{a} {r['bpb']:.4f}" for a, r in res["final_bpb"].items()))

    # 4. BPB vs context
    ctx_docs = [read_book(p, cfg["ctx_doc_bytes"]) for p in split["validation"]]
    ctx: dict[str, Any] = {"doc_bytes": cfg["ctx_doc_bytes"], "score_tokens": cfg["ctx_score_tokens"],
                           "train_len": cfg["seq_len"]}
    ctx["megalodon"] = bpb_vs_context(models["megalodon"], tok, ctx_docs, [*cfg["contexts"], None],
                                      cfg["ctx_score_tokens"])
    llama_max = cfg.get("llama_full_max") or max(cfg["contexts"])  # beyond it: the sliding window only
    ctx["llama"] = bpb_vs_context(models["llama"], tok, ctx_docs, [c for c in cfg["contexts"] if c <= llama_max],
                                  cfg["ctx_score_tokens"])
    # A sliding window of T predicts each token from at most T tokens: the windowed score at C = T.
    at_t = [r["bpb"] for r in ctx["llama"]["results"] if r["context"] == cfg["seq_len"]]
    ctx["llama_sliding"] = at_t[0] if at_t else bpb_vs_context(models["llama"], tok, ctx_docs, [cfg["seq_len"]],
                                                               cfg["ctx_score_tokens"])["results"][0]["bpb"]
    for a in ARCHS:
        ctx[a]["n_bytes"] = ctx[a]["results"][0]["n_bytes"]
        log(f"bpb vs context {a}: " + ", ".join(f"{r['label']} {r['bpb']:.3f}" for r in ctx[a]["results"]))
    ctx["megalodon_reset"] = reset_stage(models["megalodon"], tok, ctx_docs, cfg, log)
    res["bpb_vs_context"] = ctx
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")  # kept if a probe fails

    # 5. passkey, 6. MQAR
    corpus, _ = build_corpora(train_books, tok, cache, val_sources=curve_val, progress=False)
    train_pool = torch.from_numpy(corpus.tokens[: 1 << 22].astype("int64"))
    val_pool = torch.tensor(list(b"\n".join(final_docs)), dtype=torch.long)
    if cfg["passkey"]:  # --set passkey=null / mqar=null skip a probe
        res["passkey"] = passkey_stage(models, cfg, lrs, train_pool, val_pool, tok, device, log)
    if cfg["mqar"]:
        res["mqar"] = mqar_stage(cfg, tok.vocab_size, device, log)

    res["total_seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(res))
    written = plots(res, out)
    log(f"done in {res['total_seconds'] / 60:.1f} min: {out / 'results.json'}, {out / 'results.md'}, "
        + ", ".join(written))
    print(markdown(res))
    return res


def parse_overrides(items: list[str], base: dict[str, Any]) -> dict[str, Any]:
    """["steps=120", "contexts=[256, 4096]"] -> {"steps": 120, "contexts": [256, 4096]}; keys must exist in base."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        known = {*base, *OPTIONAL_KEYS}
        if not sep or key not in known:
            raise ValueError(f"--set {item!r}: expected KEY=JSON with KEY one of {', '.join(sorted(known))}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"--set {item!r}: the value is not JSON ({err})") from None
    return out


def rerun_mqar(args: argparse.Namespace) -> int:
    """--only mqar: stage 6 alone, with the setting and --set overrides, merged into OUT/results.json."""
    out = args.out or Path("runs") / f"h2h-{args.setting}"
    done = out / "results.json"
    if not args.resume or not done.is_file():
        print(f"head_to_head: --only needs --resume and a finished run in {out} (no {done.name})", file=sys.stderr)
        return 2
    try:
        res = json.loads(done.read_text())
        overrides = parse_overrides(args.set, SETTINGS[args.setting])
    except (ValueError, OSError) as err:
        print(f"head_to_head: {err}", file=sys.stderr)
        return 2
    if res.get("setting") != args.setting:
        print(f"head_to_head: {done} is from setting {res.get('setting')!r}, not {args.setting!r}", file=sys.stderr)
        return 2
    cfg = {**SETTINGS[args.setting], **overrides}
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    t_start = time.perf_counter()
    from megalodon_lm.data.tokenizer import ByteTokenizer

    res["mqar"] = mqar_stage(cfg, ByteTokenizer().vocab_size, torch.device(cfg["device"]),
                             lambda msg: print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True))
    res["config"]["mqar"] = cfg["mqar"]
    res["overrides"] = {**res.get("overrides", {}), **overrides}
    done.write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(res))
    plots(res, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--out", type=Path, default=None, help="output directory [runs/h2h-<setting>]")
    p.add_argument("--books", type=Path, default=DEFAULT_BOOKS,
                   help=f"folder of books: fetch_books.py's output or any .txt files [{DEFAULT_BOOKS or 'none found'}]")
    p.add_argument("--cache-dir", type=Path, default=None, help="tokenized-data cache [OUT/token-cache]")
    p.add_argument("--overwrite", action="store_true", help="delete an existing OUT first")
    p.add_argument("--resume", action="store_true",
                   help="reuse OUT: training runs that finished there with the same options are not repeated")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a field of the setting, e.g. --set steps=120 --set 'contexts=[256,4096]' "
                        "(recorded in results.json)")
    p.add_argument("--only", choices=["mqar"], default=None,
                   help="with --resume: rerun only this stage into OUT's results.json (MQAR trains its own models)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        return _worker(args._worker)
    if args.only:
        return rerun_mqar(args)
    try:
        if args.books is None:
            raise FileNotFoundError(NO_BOOKS)
        book_split(args.books)  # a bad books folder fails here, in one line
    except (FileNotFoundError, ValueError) as err:
        print(f"head_to_head: {err}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / f"h2h-{args.setting}"
    try:
        overrides = parse_overrides(args.set, SETTINGS[args.setting])
    except ValueError as err:
        print(f"head_to_head: {err}", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()) and not args.resume:
        if not args.overwrite:
            print(f"head_to_head: {out} is not empty (pass --overwrite to replace it, --resume to reuse it)",
                  file=sys.stderr)
            return 2
        shutil.rmtree(out)
    if SETTINGS[args.setting]["device"] == "cuda" and not torch.cuda.is_available():
        print("head_to_head: the gpu setting needs CUDA", file=sys.stderr)
        return 2
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("head_to_head: the Llama baseline needs transformers (pip install 'megalodon-lm[hf]')", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    try:
        run(args.setting, out, args.books, args.cache_dir, overrides)
    except FileNotFoundError as err:
        print(f"head_to_head: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
