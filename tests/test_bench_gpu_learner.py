"""bench/gpu_learner.py --tiny: the same script that runs on a GPU, on CPU with a tiny Qwen3."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_cpu_run_prints_both_steps_with_consistent_rates():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_learner.py"), "--tiny", "--seq-lens", "40",
                          "--groups", "1", "--samples", "4", "--steps", "1"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in out.stdout.splitlines()
            if ln.startswith("| 40 ")]
    assert [r[1] for r in rows] == ["rlrt", "plain"]
    (_, _, rl_s, rl_tps, rl_all, _, ratio), (_, _, pl_s, pl_tps, pl_all, _, base) = rows
    # 1 group x 4 samples x (40 - 16 prompt) = 96 trained tokens, 160 in all
    assert float(rl_tps) == pytest.approx(96 / float(rl_s), rel=0.02)
    assert float(pl_all) == pytest.approx(160 / float(pl_s), rel=0.02)
    assert float(rl_all) / float(rl_tps) == pytest.approx(160 / 96, rel=0.02)
    assert base == "1.00x"
    assert float(ratio.rstrip("x")) == pytest.approx(float(pl_s) / float(rl_s), rel=0.05, abs=0.01)
