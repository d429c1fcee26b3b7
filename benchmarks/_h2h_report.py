"""Tables, curves and plots of benchmarks/head_to_head.py (pure functions of its results dict)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARCH_LABEL = {"megalodon": "Megalodon", "llama": "Llama (HF, sdpa)",
              "megalodon_full": "Megalodon, one chunk over N (control)"}  # MQAR's optional control


def read_curve(metrics_path: str | Path) -> list[dict[str, float]]:
    """Validation points of a run: step, tokens, elapsed, train_time (elapsed minus earlier evaluations), val_bpb.

    The trainer logs a training line at every evaluation step (log_every divides eval_every) right before the
    evaluation, so each evaluation's duration is its line's elapsed minus that training line's.
    """
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train_at = {r["step"]: r["elapsed"] for r in records if "loss" in r}
    points, eval_time = [], 0.0
    for r in records:
        if "val_bpb" not in r:
            continue
        before = train_at.get(r["step"], r["elapsed"])
        points.append({"step": r["step"], "tokens": r["tokens"], "elapsed": r["elapsed"],
                       "train_time": before - eval_time, "val_bpb": r["val_bpb"]})
        eval_time += r["elapsed"] - before
    return points


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """Linear interpolation of y at x inside [xs[0], xs[-1]] (xs increasing); None outside."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            span = xs[i] - xs[i - 1]
            w = 0.0 if span == 0 else (x - xs[i - 1]) / span
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return ys[-1]


def equal_time(curves: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """BPB of every model at the shortest final training time among them (interpolated along its curve)."""
    horizon = min(c[-1]["train_time"] for c in curves.values())
    return {"train_time": horizon,
            "val_bpb": {a: interpolate([p["train_time"] for p in c], [p["val_bpb"] for p in c], horizon)
                        for a, c in curves.items()}}


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(res: dict[str, Any]) -> str:
    """The results as markdown tables (main table first)."""
    archs = list(res["train"])
    lines = [f"Setting `{res['setting']}`; {res['system'].get('cpu_model') or res['system']['device']}, "
             f"{res['system']['torch_num_threads']} threads, torch {res['system']['torch']}, "
             f"transformers {res['system'].get('transformers')}, {res['system']['date']}.", ""]
    lines += ["| model | params | lr (check) | tokens | train time | tokens/s | peak memory | val BPB (curve slices) "
              "| BPB first slice of each val book, context T | BPB at equal time |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    eq = res["equal_time"]
    for a in archs:
        t = res["train"][a]
        lines.append(f"| {ARCH_LABEL[a]} | {t['params']:,} | {t['lr']:g} | {t['tokens']:,} | {t['train_time']:.0f} s | "
                     f"{t['tokens_per_s']:,.0f} | {t['peak_memory_bytes'] / 2**20:,.0f} MiB | {_fmt(t['val_bpb'])} | "
                     f"{_fmt(res['final_bpb'][a]['bpb'])} | {_fmt(eq['val_bpb'][a])} |")
    lines += ["", f"Equal time = {eq['train_time']:.0f} s of training (the shorter run), evaluations excluded.", ""]
    lines += ["Learning-rate check (val BPB after the short run):", "",
              "| model | " + " | ".join(f"lr {lr:g}" for lr in res["lr_check"]["grid"]) + " |",
              "|---|" + "---|" * len(res["lr_check"]["grid"])]
    for a in archs:
        lines.append(f"| {ARCH_LABEL[a]} | " + " | ".join(_fmt(res["lr_check"]["bpb"][a].get(str(lr)))
                                                      for lr in res["lr_check"]["grid"]) + " |")
    ctx = res["bpb_vs_context"]
    labels = [r["label"] for r in ctx["megalodon"]["results"]]
    lines += ["", f"BPB vs context (same {ctx['megalodon']['n_bytes']:,} scored bytes at every length, the last "
              f"{ctx['score_tokens']} tokens of the first {ctx['doc_bytes'] // 1024} KiB of each validation book):",
              "", "| model | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    rows = {"Megalodon (state reset every C; whole = streamed prefix)": ctx["megalodon"]["results"],
            "Llama, full attention over C": ctx["llama"]["results"]}
    for name, results in rows.items():
        by_label = {r["label"]: r["bpb"] for r in results}
        lines.append(f"| {name} | " + " | ".join(_fmt(by_label.get(lb)) for lb in labels) + " |")
    lines.append(f"| Llama, sliding window {ctx['train_len']} | " + " | ".join(
        _fmt(ctx["llama_sliding"]) if lb == "whole" or int(lb) >= ctx["train_len"] else "-" for lb in labels) + " |")
    lines += reset_table(res)
    lines += probe_tables(res, archs)
    return "\n".join(lines) + "\n"


def reset_table(res: dict[str, Any]) -> list[str]:
    """Megalodon's reset ablation: whole-prefix BPB carried vs with each memory path reset (same scored bytes)."""
    ctx = res["bpb_vs_context"]
    rows = ctx.get("megalodon_reset") or []
    if not rows:
        return []
    carried = next(r["bpb"] for r in ctx["megalodon"]["results"] if r["context"] is None)
    lines = ["", "Reset ablation (Megalodon, whole prefix streamed; the named state reset to its initial value every "
             "N tokens from the book's start; same scored bytes; reset minus carried = what that path carries):", "",
             "| state reset | every N tokens | BPB | reset - carried |", "|---|---|---|---|",
             f"| nothing (carried) | - | {carried:.4f} | 0 |"]
    names = {"cema": "CEMA state", "norm": "TimestepNorm statistics", "both": "CEMA + TimestepNorm", "none": "nothing"}
    for r in rows:
        lines.append(f"| {names[r['reset']]} | {r['reset_every']} | {r['bpb']:.4f} | {r['bpb'] - carried:+.4f} |")
    return lines


def probe_tables(res: dict[str, Any], archs: list[str]) -> list[str]:
    """Passkey and MQAR tables (each only when that probe ran)."""
    lines: list[str] = []
    pk = res.get("passkey")
    if pk:
        lines += ["", f"Passkey (fine-tuned {pk['steps']} steps at length {pk['train_length']}, key in an earlier "
                  f"{pk['chunk']}-token chunk than the question; {pk['trials']} trials per length; accuracy / bits "
                  "per digit, chance 0 / 3.32):", "",
                  "| model | " + " | ".join(str(r["length"]) for r in pk["megalodon"]) + " |",
                  "|---|" + "---|" * len(pk["megalodon"])]
        for a in archs:
            lines.append(f"| {ARCH_LABEL[a]} | " + " | ".join(f"{r['accuracy']:.2f} / {r['bits_per_digit']:.2f}"
                                                             for r in pk[a]) + " |")
        if pk["megalodon"] and pk.get("megalodon_by_distance"):
            dists = [r["distance"] for r in pk["megalodon_by_distance"]]
            lines += ["", f"Passkey accuracy vs distance (key line d tokens before the question, length "
                      f"{pk['train_length']}; Megalodon's chunk {pk['chunk']}):", "",
                      "| model | " + " | ".join(f"d = {d}" for d in dists) + " |", "|---|" + "---|" * len(dists)]
            for a in archs:
                lines.append(f"| {ARCH_LABEL[a]} | " + " | ".join(f"{r['accuracy']:.2f}"
                                                                 for r in pk[a + "_by_distance"]) + " |")
    mq = res.get("mqar")
    mq_models = [a for a in ARCH_LABEL if mq and a in mq]
    if mq and mq["megalodon"].get("by_distance"):
        bins = [(b["min"], b["max"]) for b in mq["megalodon"]["by_distance"]]
        lines += ["", "MQAR accuracy vs distance from the query to its key (chunk "
                  f"{mq['chunk']}):", "", "| model | " + " | ".join(f"{lo}-{hi - 1}" for lo, hi in bins) + " |",
                  "|---|" + "---|" * len(bins)]
        for a in mq_models:
            by = {(b["min"], b["max"]): b["accuracy"] for b in mq[a].get("by_distance", [])}
            lines.append(f"| {ARCH_LABEL[a]} | " + " | ".join(_fmt(by.get(k), ".3f") for k in bins) + " |")
    if mq:
        mix = f", trained on rows of {mq['min_pairs']}-{mq['num_pairs']} pairs" if mq.get("min_pairs") else ""
        lines += ["", f"MQAR (trained from scratch, {mq['steps']} steps{mix}; N = {mq['seq_len']}, "
                  f"{mq['num_pairs']} pairs, queries from position {mq['query_start']}; Megalodon's chunk "
                  f"{mq['chunk']}):", "", "| model | params | accuracy |", "|---|---|---|"]
        for a in mq_models:
            lines.append(f"| {ARCH_LABEL[a]} | {mq[a]['params']:,} | {mq[a]['accuracy']:.3f} |")
    return lines


def plots(res: dict[str, Any], out_dir: str | Path) -> list[str]:
    """bpb_vs_tokens.png, bpb_vs_time.png, bpb_vs_context.png; [] when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = Path(out_dir)
    written = []
    for key, xlabel, name in (("tokens", "training tokens", "bpb_vs_tokens.png"),
                              ("train_time", "training time (s, evaluations excluded)", "bpb_vs_time.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for a, curve in res["curves"].items():
            ax.plot([p[key] for p in curve], [p["val_bpb"] for p in curve], marker="o", label=ARCH_LABEL[a])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation bits per byte")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(name)
    ctx = res["bpb_vs_context"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for a, style in (("megalodon", "o-"), ("llama", "s-")):
        pts = [(r["context"], r["bpb"]) for r in ctx[a]["results"] if r["context"] is not None]
        ax.plot([c for c, _ in pts], [b for _, b in pts], style, label=f"{ARCH_LABEL[a]}, context C")
    whole = [r["bpb"] for r in ctx["megalodon"]["results"] if r["context"] is None]
    if whole:
        ax.axhline(whole[0], linestyle="--", color="tab:blue", label="Megalodon, whole prefix streamed")
    colors = ("tab:green", "tab:purple", "tab:brown", "tab:gray", "tab:olive", "tab:cyan")
    for r, color in zip(ctx.get("megalodon_reset") or [], colors, strict=False):
        ax.axhline(r["bpb"], linestyle="-.", color=color, linewidth=1,
                   label=f"Megalodon, whole prefix, {r['reset']} reset every {r['reset_every']}")
    right = max(r["context"] for r in ctx["megalodon"]["results"] if r["context"] is not None)
    ax.hlines(ctx["llama_sliding"], ctx["train_len"], right, linestyles=":", colors="tab:orange",
              label=f"Llama, sliding window {ctx['train_len']} (C >= {ctx['train_len']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context C (tokens)")
    ax.set_ylabel("bits per byte")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bpb_vs_context.png")
    plt.close(fig)
    written.append("bpb_vs_context.png")
    if probe_plot(res, out, plt):
        written.append("probes_vs_distance.png")
    return written


def probe_plot(res: dict[str, Any], out: Path, plt: Any) -> bool:
    """probes_vs_distance.png: passkey and MQAR accuracy against the key's distance, both models, with
    Megalodon's attention chunk marked; False when neither probe has a by-distance result."""
    pk, mq = res.get("passkey") or {}, res.get("mqar") or {}
    panels = []
    if pk.get("megalodon_by_distance"):
        panels.append(("passkey", pk["chunk"], {a: [(r["distance"], r["accuracy"]) for r in pk[a + "_by_distance"]]
                                                for a in ARCH_LABEL if a + "_by_distance" in pk}))
    if mq.get("megalodon", {}).get("by_distance"):
        beyond = mq.get("query_start", 0) >= mq["chunk"]  # then no query shares a chunk with any key
        series = {a: [((b["min"] + b["max"] - 1) / 2, b["accuracy"]) for b in mq[a]["by_distance"]
                      if b.get("accuracy") is not None] for a in ARCH_LABEL if a in mq}
        panels.append(("MQAR, every query in a later chunk than the keys" if beyond else "MQAR", mq["chunk"], series))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (name, chunk, series) in zip(axes[0], panels, strict=True):
        for a, pts in series.items():
            ax.plot([d for d, _ in pts], [acc for _, acc in pts], {"megalodon": "o-", "llama": "s-"}.get(a, "^--"),
                    label=ARCH_LABEL[a])
        ax.axvline(chunk, linestyle=":", color="gray", label=f"Megalodon's chunk ({chunk})")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("distance from key to question (tokens)" if name == "passkey"
                      else "distance from query to its key (tokens, bin centre)")
        ax.set_ylabel("accuracy")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "probes_vs_distance.png")
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Rebuild results.md and the plots from a results.json: `python benchmarks/_h2h_report.py OUT`."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "results.json").is_file():
        print("usage: python benchmarks/_h2h_report.py OUT (a head_to_head.py output folder with results.json)",
              file=sys.stderr)
        return 2
    out = Path(args[0])
    res = json.loads((out / "results.json").read_text())
    (out / "results.md").write_text(markdown(res))
    print(", ".join([str(out / "results.md"), *plots(res, out)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
