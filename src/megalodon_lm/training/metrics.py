"""Training metrics: a JSON-lines log (plus TensorBoard when installed), reading, plotting, durations.

`run_dir/metrics.jsonl` holds one JSON object per line. Every record has an int `step`; the other keys are
the caller's. The plot understands these: `tokens` (x axis; `step` when absent), `loss` (training loss),
`val_loss` and `val_bpb` (validation loss and bits per byte). Non-finite floats are written as null and their
keys listed under `nonfinite`, so the file stays strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "curves.png"


# ---------------------------------------------------------------------- reading
def _parse_lines(text: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) pairs. An unterminated last line is the debris of a crash mid-write and is skipped."""
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]
    parsed = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not a JSON record ({exc})") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object")
        parsed.append((line, record))
    if tail.strip():
        try:
            record = json.loads(tail)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            parsed.append((tail, record))
    return parsed


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of `run_dir/metrics.jsonl` in order; [] when there is no log yet."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [record for _, record in _parse_lines(path.read_text(encoding="utf-8"), path)]


# ---------------------------------------------------------------------- writing
def _summary_writer_class() -> Any:
    """torch's TensorBoard SummaryWriter, or None when the tensorboard package is missing or broken."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    except Exception as exc:  # a broken optional extra (e.g. a protobuf clash) must not stop training
        warnings.warn(f"TensorBoard logging disabled: importing it failed ({exc})", stacklevel=3)
        return None
    return SummaryWriter


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    # Tensors and numpy scalars are common in records; .item() turns them into Python numbers.
    if not isinstance(value, (str, bytes)) and hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"metrics value of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


class MetricsLogger:
    """Appends records to `run_dir/metrics.jsonl` (one flushed line each) and, optionally, to TensorBoard."""

    def __init__(self, run_dir: str | Path, use_tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._drop_partial_line()
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer_cls = _summary_writer_class() if use_tensorboard else None
        self._writer = self._writer_cls(log_dir=str(self.run_dir / TENSORBOARD_DIR)) if self._writer_cls else None

    @property
    def tensorboard_enabled(self) -> bool:
        return self._writer is not None

    def _drop_partial_line(self) -> None:
        # Appending after a crash-truncated line would glue the next record onto it and corrupt both.
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record; it needs an int `step`."""
        if self._file.closed:
            raise RuntimeError("MetricsLogger is closed")
        step = _plain(record.get("step"))
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"a metrics record needs an int 'step', got {record.get('step')!r}")
        clean: dict[str, Any] = {}
        nonfinite = []
        for key, value in record.items():
            value = _plain(value)
            if isinstance(value, float) and not math.isfinite(value):
                nonfinite.append(key)
                value = None
            clean[key] = value
        if nonfinite:
            clean["nonfinite"] = nonfinite
        self._file.write(json.dumps(clean, allow_nan=False, default=_json_default) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                value = _plain(value)
                if key != "step" and _is_number(value):
                    self._writer.add_scalar(key, value, global_step=step)

    def truncate_after(self, step: int) -> None:
        """Keep only records with step <= `step` (atomic rewrite), so a resumed run does not repeat lines."""
        if self._file.closed:
            raise RuntimeError("MetricsLogger is closed")
        self._file.close()
        kept = []
        if self.path.is_file():
            pairs = _parse_lines(self.path.read_text(encoding="utf-8"), self.path)
            kept = [line for line, record in pairs if _is_number(record.get("step")) and record["step"] <= step]
        tmp = self.path.with_name(f".tmp-{METRICS_FILE}-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        # The old handle points at the replaced file: reopen so later lines land in the new one.
        self._file = open(self.path, "a", encoding="utf-8")
        if self._writer is not None:
            # purge_step hides the events the interrupted run wrote after `step`.
            self._writer.close()
            self._writer = self._writer_cls(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=step + 1)

    def close(self) -> None:
        """Close the log file and the TensorBoard writer; safe to call twice."""
        self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# ---------------------------------------------------------------------- plotting
def _smooth(values: list[float]) -> list[float]:
    """Bias-corrected exponential moving average over about a twentieth of the points."""
    span = max(1, len(values) // 20)
    decay = 1.0 - 2.0 / (span + 1)
    out, avg = [], 0.0
    for i, value in enumerate(values, 1):
        avg = decay * avg + (1.0 - decay) * value
        out.append(avg / (1.0 - decay**i) if decay > 0 else value)
    return out


def _series(records: list[dict[str, Any]], key: str, x_key: str) -> tuple[list[float], list[float]]:
    points = [(r[x_key], r[key]) for r in records if _is_number(r.get(key)) and _is_number(r.get(x_key))]
    return [x for x, _ in points], [y for _, y in points]


def plot_metrics(run_dir: str | Path, out_path: str | Path | None = None) -> Path | None:
    """Loss curves as a PNG (default `run_dir/curves.png`); None, and nothing written, without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    run_dir = Path(run_dir)
    out = Path(out_path) if out_path is not None else run_dir / PLOT_FILE
    records = read_metrics(run_dir)
    plotted = [r for r in records if any(_is_number(r.get(k)) for k in ("loss", "val_loss", "val_bpb"))]
    x_key = "tokens" if plotted and all(_is_number(r.get("tokens")) for r in plotted) else "step"

    train_x, train_y = _series(records, "loss", x_key)
    val_x, val_y = _series(records, "val_loss", x_key)
    bpb_x, bpb_y = _series(records, "val_bpb", x_key)
    panels = 2 if bpb_y else 1
    # Figure + the Agg canvas directly: no pyplot, so no global backend switch in the caller's process.
    fig = Figure(figsize=(8, 4 * panels))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(panels, 1, 1)
    if train_y:
        ax.plot(train_x, train_y, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
        ax.plot(train_x, _smooth(train_y), color="tab:blue", label="train loss (smoothed)")
    if val_y:
        ax.plot(val_x, val_y, color="tab:orange", marker="o", markersize=3, label="validation loss")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    if train_y or val_y:
        ax.legend()
    ax.grid(alpha=0.3)
    if bpb_y:
        ax2 = fig.add_subplot(2, 1, 2, sharex=ax)
        ax2.plot(bpb_x, bpb_y, color="tab:green", marker="o", markersize=3, label="validation bits/byte")
        ax2.set_ylabel("bits per byte")
        ax2.legend()
        ax2.grid(alpha=0.3)
    fig.axes[-1].set_xlabel(x_key)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


# ---------------------------------------------------------------------- durations
_NUMBER = r"\d+(?:\.\d+)?"
_PLAIN_RE = re.compile(_NUMBER)
_UNITS_RE = re.compile(rf"(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m)?(?:(?P<s>{_NUMBER})s)?")
_DURATION_FORMS = "plain seconds ('90'), '90s', '10m', '2h', or combined like '1h30m' / '1h2m3s'"


def format_duration(seconds: float) -> str:
    """'1h02m03s', '2m05s' or '45s' (rounded to whole seconds)."""
    if isinstance(seconds, bool) or not _is_number(seconds) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be a non-negative finite number of seconds, got {seconds!r}")
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def parse_duration(text: str | float) -> float:
    """Seconds from '90', '90s', '10m', '2h', '1h30m', ... (a non-negative number is taken as seconds)."""
    if _is_number(text):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"invalid duration {text!r}: must be non-negative; accepted forms: {_DURATION_FORMS}")
        return float(text)
    if not isinstance(text, str):
        raise ValueError(f"invalid duration {text!r}; accepted forms: {_DURATION_FORMS}")
    compact = text.strip().lower()
    if _PLAIN_RE.fullmatch(compact):
        return float(compact)
    match = _UNITS_RE.fullmatch(compact)
    if not compact or match is None:
        raise ValueError(f"invalid duration {text!r}; accepted forms: {_DURATION_FORMS}")
    h, m, s = (float(match.group(k) or 0) for k in ("h", "m", "s"))
    return h * 3600 + m * 60 + s
