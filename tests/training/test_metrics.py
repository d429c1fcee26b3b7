"""MetricsLogger, read_metrics, plot_metrics and the duration helpers."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from megalodon_lm.training import metrics
from megalodon_lm.training.metrics import MetricsLogger, format_duration, parse_duration, plot_metrics, read_metrics


def _steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


def test_log_and_read(tmp_path):
    assert read_metrics(tmp_path) == []
    logger = MetricsLogger(tmp_path, use_tensorboard=False)
    logger.log({"step": 1, "tokens": 64, "loss": 5.5, "lr": 1e-4, "phase": "train"})
    # Each line is flushed: readable before close.
    assert read_metrics(tmp_path) == [{"step": 1, "tokens": 64, "loss": 5.5, "lr": 1e-4, "phase": "train"}]
    logger.log({"step": 2, "loss": float("nan"), "grad_norm": float("inf"), "val_loss": torch.tensor(2.5)})
    logger.close()
    logger.close()
    second = read_metrics(tmp_path)[1]
    assert second == {"step": 2, "loss": None, "grad_norm": None, "val_loss": 2.5, "nonfinite": ["loss", "grad_norm"]}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=pytest.fail)  # strict JSON: no NaN / Infinity tokens
    with pytest.raises(RuntimeError, match="closed"):
        logger.log({"step": 3})


def test_record_needs_int_step(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False) as logger:
        with pytest.raises(ValueError, match="step"):
            logger.log({"loss": 1.0})
        with pytest.raises(ValueError, match="step"):
            logger.log({"step": 1.5})
        logger.log({"step": torch.tensor(3)})
    assert _steps(tmp_path) == [3]


def test_truncate_after_then_append(tmp_path):
    logger = MetricsLogger(tmp_path, use_tensorboard=False)
    for step in range(1, 6):
        logger.log({"step": step, "loss": 1.0 / step})
    logger.truncate_after(3)
    assert _steps(tmp_path) == [1, 2, 3]
    logger.log({"step": 4, "loss": 0.3})  # lands in the rewritten file, not the replaced one
    logger.close()
    assert _steps(tmp_path) == [1, 2, 3, 4]
    with MetricsLogger(tmp_path, use_tensorboard=False) as again:
        again.truncate_after(0)
    assert read_metrics(tmp_path) == []


def test_crash_truncated_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert _steps(tmp_path) == [1]
    with MetricsLogger(tmp_path, use_tensorboard=False) as logger:
        logger.log({"step": 2, "loss": 1.5})
    assert _steps(tmp_path) == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path)


class _FakeWriter:
    instances: list[_FakeWriter] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        _FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def close(self):
        self.closed = True


def test_tensorboard_scalars(tmp_path, monkeypatch):
    _FakeWriter.instances = []
    monkeypatch.setattr(metrics, "_summary_writer_class", lambda: _FakeWriter)
    logger = MetricsLogger(tmp_path)
    assert logger.tensorboard_enabled
    logger.log({"step": 7, "tokens": 100, "loss": 2.0, "phase": "train", "clipped": True, "lr": torch.tensor(0.5)})
    writer = _FakeWriter.instances[0]
    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert writer.scalars == [("tokens", 100, 7), ("loss", 2.0, 7), ("lr", 0.5, 7)]
    logger.truncate_after(5)
    assert writer.closed and _FakeWriter.instances[1].purge_step == 6
    logger.close()
    assert _FakeWriter.instances[1].closed
    assert not MetricsLogger(tmp_path, use_tensorboard=False).tensorboard_enabled


def test_real_tensorboard_if_installed(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path) as logger:
        logger.log({"step": 1, "loss": 3.0})
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    # Make every `import matplotlib...` raise ImportError, also when another test imported it already.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    with MetricsLogger(tmp_path, use_tensorboard=False) as logger:
        logger.log({"step": 1, "tokens": 10, "loss": 3.0})
    assert plot_metrics(tmp_path) is None
    assert not (tmp_path / "curves.png").exists()


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    with MetricsLogger(tmp_path, use_tensorboard=False) as logger:
        for step in range(1, 41):
            logger.log({"step": step, "tokens": step * 256, "loss": 5.0 / step ** 0.5})
            if step % 10 == 0:
                logger.log({"step": step, "tokens": step * 256, "val_loss": 5.2 / step ** 0.5, "val_bpb": 1.5})
    out = plot_metrics(tmp_path)
    assert out == tmp_path / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    custom = plot_metrics(tmp_path, tmp_path / "plots" / "c.png")
    assert custom.is_file()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45.4, "45s"), (59.6, "1m00s"), (125, "2m05s"), (3723, "1h02m03s"), (90000, "25h00m00s")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == round(seconds)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400), ("1h2m3s", 3723), (" 1.5H ", 5400),
     ("0.5", 0.5), (120, 120)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-5", "1h30", "10 m", "5d", "m", "inf", "30m1h", -3])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="90s"):
        parse_duration(text)


def test_format_duration_rejects():
    for bad in (-1, float("inf"), float("nan"), "10"):
        with pytest.raises(ValueError):
            format_duration(bad)
