"""benchmarks/cema_train_speed.py runs end to end (`--quick` at L=64, one thread) and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "cema_train_speed.py"


def test_cema_train_speed_smoke(tmp_path):
    out = tmp_path / "cema_train_speed.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                       os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--lengths", "64", "--threads", "1",
                           "--repeats", "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = json.loads(out.read_text())["results"]
    assert rec["length"] == 64 and rec["threads"] == 1
    assert set(rec["median_s"]) == {"chunk/fwd+bwd", "chunk/fwd", "chunk_fn/fwd+bwd", "chunk_fn/fwd"}
    assert all(t > 0 for t in rec["median_s"].values())
    assert rec["max_rel_grad_diff"] <= 1e-5  # fp32: the two paths compute the same gradients
