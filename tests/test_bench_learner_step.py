"""bench/learner_step.py: the three configurations run on the same batches and the table holds
their measured figures (the tiny model; the figures themselves are in docs/BENCHMARKS.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_learner_step_ab_on_the_tiny_model() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "learner_step.py"), "--model", "tiny", "--repeats", "2",
                          "--groups", "2", "--samples", "4"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "s/step" not in line]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["before: separate π_old pass, micro-batch 32", "detached π_old, micro-batch 32",
                     "now: detached π_old, micro-batch 8"]
    for r in rows:
        med, lo, hi, tok, ratio = map(float, re.findall(r"(\d+\.\d+)", r))
        assert 0 < lo <= med <= hi and tok > 0 and ratio > 0
    assert rows[0].rstrip(" |").endswith("1.00x")
    # every configuration timed one warm-up and two repeats
    assert len(re.findall(r"^  #\d ", out.stdout, flags=re.M)) == 6
