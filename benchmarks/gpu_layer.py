"""One Megalodon block at the paper's 7B width vs one Llama2-7B decoder layer (SDPA / FlashAttention), bf16,
forward+backward at long context; plus the copy bandwidth and the CEMA / TimestepNorm kernels' bandwidth.

    python benchmarks/gpu_layer.py --out benchmarks/results/gpu_layer.json   # one H200: a few minutes (< 8)
    python benchmarks/gpu_layer.py --smoke --out /tmp/gpu_layer.json        # CPU, tiny widths: seconds

Sections (each case is guarded: an out-of-memory error is recorded and the run goes on):

* copy: `dst.copy_(src)` of 1 GiB; GB/s = 2 x bytes / median time (read + write). The reference for the
  kernel targets (CEMA and TimestepNorm forward+backward toward 60% of it).
* ops: CEMA (D = 4096, N = 16) and TimestepNorm (D = 4096, G = 64) at B = 1, bf16 activations, forward then
  torch.autograd.grad w.r.t. x and the parameters, through the dispatcher (`auto`: Triton on CUDA) and through
  the PyTorch paths (chunk / prefix). Bytes = 5 activation-sized transfers (forward reads x and writes y; the
  backward reads x and dy and writes dx) + parameters and their gradients: the least traffic any implementation
  needs, so GB/s / copy GB/s is the fraction of the memory-bound ideal.
* layers: `MegaBlock` of MegalodonConfig.from_preset('7B') (model_dim 4096, z 1024, value 8192, 4 heads,
  SwiGLU FFN 8192, chunk 4096, CEMA N = 16, 64 norm groups) vs HF `LlamaDecoderLayer` (hidden 4096, 32 heads,
  intermediate 11008, attn_implementation='sdpa', causal, no mask: FlashAttention on CUDA), both bf16, batch 1,
  at 4K and 32K tokens. One step = forward + backward of <y, dy> w.r.t. the input and all parameters.
  Reported: tokens/s = L / median step time, and peak memory (max_memory_allocated during the step minus
  the memory allocated before it; CUDA only). Megalodon also runs with the PyTorch CEMA/norm paths.

`--smoke` shrinks every width (model 64, Llama hidden 64) and length (64, 128), 1 repeat, 8 MiB copy: it only
checks that the script runs end to end (tests/benchmarks/test_gpu_layer.py).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _common import (
    RESULTS_DIR,
    fmt,
    fmt_bytes,
    fmt_len,
    median,
    parse_lengths,
    pick_device,
    print_table,
    save_json,
    set_threads,
    system_info,
    time_repeated,
)

from megalodon_lm import MegalodonConfig
from megalodon_lm.models.megalodon import MegaBlock
from megalodon_lm.modules.mega import StreamInfo
from megalodon_lm.modules.rotary import RotaryEmbedding
from megalodon_lm.ops import cema, cema_coefficients, timestep_norm
from megalodon_lm.ops._triton import triton_available

SMOKE_MEGA = dict(model_dim=64, z_dim=32, value_dim=128, num_heads=2, ffn_hidden_dim=128, cema_ndim=4,
                  chunk_size=32, norm_num_groups=8)
SMOKE_LLAMA = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128)
LLAMA_7B = dict(hidden_size=4096, num_attention_heads=32, intermediate_size=11008)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Temporarily set environment variables (the op dispatch reads MEGALODON_*_IMPL at call time)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _guarded(device: torch.device, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one case; an out-of-memory error becomes {'error': 'out of memory'}."""
    try:
        return fn()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        if not _is_oom(err):
            raise
        return {"error": "out of memory"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _peak_step(step: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated during one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# ---------------------------------------------------------------------------------------- copy
def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, repeats: int) -> dict[str, Any]:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = median(time_repeated(lambda: dst.copy_(src), device, warmup, max(repeats, 5)))
    return {"bytes": nbytes, "median_s": t, "gb_per_s": 2 * nbytes / t / 1e9}


# ---------------------------------------------------------------------------------------- ops
def op_cases(D: int, N: int, G: int, L: int, dtype: torch.dtype, device: torch.device,
             gen: torch.Generator) -> dict[str, tuple[Callable[[], Any], int, dict[str, str]]]:
    """name -> (fwd+bwd closure, least bytes moved, env forcing the path): CEMA and TimestepNorm, auto and PyTorch."""
    def rnd(*shape: int, std: float = 1.0, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device, dt).requires_grad_()

    x = rnd(1, L, D, dt=dtype)
    gy = torch.randn(1, L, D, generator=gen).to(device, dtype)
    act = x.numel() * x.element_size()
    alpha, delta, gamma, omega = rnd(D, N, 1, std=0.2), rnd(D, N, 1, std=0.2), rnd(D, N, 2), rnd(D, 1, std=0.25)
    freqs = torch.exp(-torch.arange(1, D + 1, dtype=torch.float64) * math.log(D) / D).clamp(max=1 - 1e-6)
    theta = torch.logit(freqs).float().view(D, 1, 1).to(device).requires_grad_()
    cema_params = [alpha, delta, theta, gamma, omega]
    weight, bias = rnd(D, std=0.1), rnd(D, std=0.1)
    count = torch.zeros(1, dtype=torch.long, device=device)
    mean, var = torch.zeros(1, G, device=device), torch.ones(1, G, device=device)

    def nbytes(params: list[torch.Tensor]) -> int:
        return 5 * act + 2 * sum(p.numel() * p.element_size() for p in params)

    def cema_step() -> Any:
        y = cema(x, cema_coefficients(*cema_params))[0]
        return torch.autograd.grad(y, [x, *cema_params], gy)

    def norm_step() -> Any:
        y = timestep_norm(x, weight, bias, G, 1e-5, count, mean, var)[0]
        return torch.autograd.grad(y, [x, weight, bias], gy)

    auto = "triton" if device.type == "cuda" and triton_available() else "auto"
    return {
        f"cema ({auto})": (cema_step, nbytes(cema_params), {}),
        "cema (chunk)": (cema_step, nbytes(cema_params), {"MEGALODON_CEMA_IMPL": "chunk"}),
        f"timestep_norm ({auto})": (norm_step, nbytes([weight, bias]), {}),
        "timestep_norm (prefix)": (norm_step, nbytes([weight, bias]), {"MEGALODON_NORM_IMPL": "prefix"}),
    }


def run_ops(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, copy_gbs: float | None,
            shape: dict[str, int]) -> list[dict[str, Any]]:
    out = []
    gen = torch.Generator().manual_seed(args.seed)
    for L in args.lengths:
        cases = _guarded(device, lambda L=L: {"cases": op_cases(shape["D"], shape["N"], shape["G"], L, dtype,
                                                                  device, gen)})
        if "error" in cases:
            out.append({"length": L, "error": cases["error"]})
            continue
        for name, (step, nbytes, env) in cases["cases"].items():
            def measure(step=step, nbytes=nbytes, env=env) -> dict[str, Any]:
                with _env(**env):
                    t = median(time_repeated(step, device, args.warmup, args.repeats))
                gbs = nbytes / t / 1e9
                return {"median_s": t, "bytes": nbytes, "gb_per_s": gbs,
                        "fraction_of_copy": gbs / copy_gbs if copy_gbs else None}

            rec = {"op": name, "length": L, **_guarded(device, measure)}
            print(f"  {name:24s} L={fmt_len(L):>4s} " + (rec.get("error") or
                  f"{rec['median_s'] * 1e3:9.3f} ms  {rec['gb_per_s']:8.1f} GB/s"), flush=True)
            out.append(rec)
        del cases
    return out


# ---------------------------------------------------------------------------------------- layers
def megalodon_block(smoke: bool, device: torch.device, dtype: torch.dtype) -> tuple[Any, MegalodonConfig]:
    cfg = MegalodonConfig.from_preset("7B", num_layers=1, **(SMOKE_MEGA if smoke else {}))
    block = MegaBlock(cfg, 0).to(device=device, dtype=dtype)
    return block, cfg


def llama_layer(smoke: bool, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    shape = SMOKE_LLAMA if smoke else LLAMA_7B
    lcfg = LlamaConfig(num_hidden_layers=1, num_key_value_heads=shape["num_attention_heads"], vocab_size=32000,
                       max_position_embeddings=32768, attn_implementation="sdpa", **shape)
    if lcfg._attn_implementation != "sdpa":
        raise RuntimeError(f"Llama built with attn_implementation={lcfg._attn_implementation!r}, expected 'sdpa'")
    return LlamaDecoderLayer(lcfg, layer_idx=0).to(device=device, dtype=dtype), LlamaRotaryEmbedding(lcfg).to(device)


def layer_case(name: str, L: int, args: argparse.Namespace, device: torch.device,
               dtype: torch.dtype) -> dict[str, Any]:
    """Forward+backward tokens/s and peak memory of one layer at batch 1, L tokens."""
    gen = torch.Generator().manual_seed(args.seed)
    if name.startswith("megalodon"):
        block, cfg = megalodon_block(args.smoke, device, dtype)
        width = cfg.model_dim
        freqs = RotaryEmbedding(cfg.head_dim, cfg.effective_rope_base).freqs.to(device)
        info = StreamInfo(None, torch.full((1,), L, device=device), torch.zeros(1, dtype=torch.long,
                                                                                  device=device), False)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return block(x, None, info, freqs)[0]
    else:
        block, rope = llama_layer(args.smoke, device, dtype)
        width = block.hidden_size
        pos = torch.arange(L, device=device).unsqueeze(0)
        cos_sin = rope(torch.zeros(1, device=device, dtype=dtype), pos)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return block(x, position_embeddings=cos_sin)

    params = [p for p in block.parameters() if p.requires_grad]
    x = torch.randn(1, L, width, generator=gen).to(device, dtype).requires_grad_()
    gy = torch.randn(1, L, width, generator=gen).to(device, dtype)

    def step() -> Any:
        return torch.autograd.grad(forward(x), [x, *params], gy)

    env = {"MEGALODON_CEMA_IMPL": "chunk", "MEGALODON_NORM_IMPL": "prefix"} if "pytorch" in name else {}
    for mode in ("loop", "off"):  # how the wide value heads reach SDPA (ops/attention/chunk.py)
        if f"v-split {mode}" in name:
            env["MEGALODON_ATTN_VALUE_SPLIT"] = mode
    with _env(**env):
        times = time_repeated(step, device, args.warmup, args.repeats)
        peak = _peak_step(step, device)
    t = median(times)
    return {"median_s": t, "times_s": times, "tokens_per_s": L / t, "peak_bytes": peak,
            "parameters": sum(p.numel() for p in params)}


def run_layers(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    # v-split: the 2048-wide value heads reach SDPA's flash kernel as 256-wide slices sharing q/k (default:
    # repeated q/k heads; loop: one call per slice; off: one math-path call with (C x C) scores).
    names = ["megalodon (auto ops)", "megalodon (auto ops, v-split loop)", "megalodon (auto ops, v-split off)",
             "megalodon (pytorch ops)", "llama2-7b layer (sdpa)"]
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: Llama baseline skipped")
        names = names[:-1]
    out = []
    for L in args.lengths:
        for name in names:
            rec = {"model": name, "length": L, **_guarded(device, lambda n=name, L=L: layer_case(n, L, args, device,
                                                                                                  dtype))}
            print(f"  {name:26s} L={fmt_len(L):>4s} " + (rec.get("error") or
                  f"{rec['tokens_per_s']:10.0f} tok/s  {rec['median_s'] * 1e3:9.1f} ms  "
                  f"peak {fmt_bytes(rec['peak_bytes'])}"), flush=True)
            out.append(rec)
    return out


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--lengths", default=None, help="default 4K,32K (smoke: 64,128)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 3, smoke 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (default 1)")
    p.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer (default 1024, smoke 8)")
    p.add_argument("--sections", default="copy,ops,layers")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny widths and lengths: an end-to-end check on CPU")
    p.add_argument("--out", default=str(RESULTS_DIR / "gpu_layer.json"))
    args = p.parse_args(argv)
    args.lengths = parse_lengths(args.lengths or ("64,128" if args.smoke else "4K,32K"))
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.copy_mib = args.copy_mib or (8 if args.smoke else 1024)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = dict(D=64, N=4, G=8) if args.smoke else dict(D=4096, N=16, G=64)
    print(f"device {device}, dtype {dtype}, torch {torch.__version__}, lengths {[fmt_len(x) for x in args.lengths]}"
          + ("" if device.type == "cuda" else "  (CPU: not the measurement this script is for)"))
    res: dict[str, Any] = {"system": system_info(device, threads),
                           "config": {"lengths": args.lengths, "repeats": args.repeats, "warmup": args.warmup,
                                      "smoke": args.smoke, "dtype": str(dtype), "batch_size": 1, "ops": shape,
                                      "triton": device.type == "cuda" and triton_available()}}
    copy_gbs = None
    if "copy" in args.sections:
        res["copy"] = copy_bandwidth(device, args.copy_mib * 2**20, args.warmup, args.repeats)
        copy_gbs = res["copy"]["gb_per_s"]
        print(f"copy bandwidth: {copy_gbs:.1f} GB/s ({fmt_bytes(args.copy_mib * 2**20)} buffer)")
    if "ops" in args.sections:
        print("\nops (forward+backward, B=1)")
        res["ops"] = run_ops(args, device, dtype, copy_gbs, shape)
    if "layers" in args.sections:
        print("\nlayers (forward+backward, B=1)")
        res["layers"] = run_layers(args, device, dtype)
        rows = [[fmt_len(r["length"]), r["model"], fmt(r.get("tokens_per_s"), ".0f"),
                 fmt(r.get("median_s") and r["median_s"] * 1e3, ".1f"), fmt_bytes(r.get("peak_bytes")),
                 r.get("error", "")] for r in res["layers"]]
        print_table(["L", "layer", "tok/s", "ms", "peak mem", "note"], rows, "layer forward+backward")
    print(f"\nresults written to {save_json(args.out, res)}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
