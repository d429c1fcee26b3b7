"""benchmarks/gpu_layer.py runs end to end (`--smoke`: tiny widths on the CPU) and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_layer.py"


def test_gpu_layer_smoke(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "gpu_layer.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                       os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["copy"]["gb_per_s"] > 0
    assert {r["op"] for r in res["ops"]} == {"cema (auto)", "cema (chunk)", "timestep_norm (auto)",
                                             "timestep_norm (prefix)"}
    assert all(r["median_s"] > 0 and r["bytes"] > 0 for r in res["ops"])
    layers = res["layers"]
    assert {r["model"] for r in layers} == {"megalodon (auto ops)", "megalodon (auto ops, v-split loop)",
                                            "megalodon (auto ops, v-split off)", "megalodon (pytorch ops)",
                                            "llama2-7b layer (sdpa)"}
    assert {r["length"] for r in layers} == {64, 128}
    assert all(r["tokens_per_s"] > 0 and r["parameters"] > 0 for r in layers)
