"""benchmarks/preset_compare.py: configurations, report, argument errors (no training here)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from preset_compare import CONFIGS, main, markdown  # noqa: E402

from megalodon_lm import MegalodonConfig  # noqa: E402


def test_configs_are_valid_presets():
    for name, (preset, overrides) in CONFIGS.items():
        assert MegalodonConfig.from_preset(preset, **overrides).num_parameters() > 0, name


def test_markdown_row():
    res = {"recipe": {"seq_len": 512, "batch_size": 8, "steps": 120, "warmup": 10, "threads": 1}, "lr": 4e-3,
           "parallel": True, "system": {"cpu_model": "cpu", "torch": "2", "date": "d"},
           "configs": {"3M": {"params": 3296256, "tokens": 491520, "train_time": 100.0, "tokens_per_s": 4915.2,
                              "curve": [{"val_bpb": 2.5}], "final_bpb": 2.4}}}
    text = markdown(res)
    assert "| 3M | 3,296,256 | 491,520 | 100 s | 4,915 | 2.5000 | 2.4000 |" in text and "in parallel" in text


def test_bad_arguments(tmp_path):
    assert main(["--configs", "huge", "--out", str(tmp_path / "o")]) == 2
    assert main(["--steps", "2", "--out", str(tmp_path / "o")]) == 2
