"""bench/peak_rss.py and bench/learner_memory.py: the figures they print are measured, by process and by phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_peak_rss_reports_each_descendant(tmp_path: Path) -> None:
    # A parent that touches 40 MB and a child that touches 300 MB: each is its own row.
    child = "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(1.5)"
    parent = (f"import subprocess, sys; a = bytearray(40 << 20); a[::4096] = b'x' * len(a[::4096]); "
              f"subprocess.run([sys.executable, '-c', {child!r}], check=True)")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "peak_rss.py"), "--every", "0.2", "--json",
                          str(tmp_path / "rss.json"), "--", sys.executable, "-c", parent],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads((tmp_path / "rss.json").read_text())
    launcher = got.pop("launcher (the command itself)")
    assert 40 <= launcher < 200, got
    (name, child_mib), = got.items()
    assert 300 <= child_mib < 450, got
    assert "sum of per-process peaks" in out.stdout


def test_learner_memory_trace_on_the_tiny_model() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "learner_memory.py"), "--model", "tiny", "--steps", "2",
                          "--groups", "2", "--samples", "4"], env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1].endswith(" MiB"):
            rows[cells[0].split(" (")[0]] = (int(cells[1].split()[0]), int(cells[2].split()[0]))
    assert list(rows) == ["imports", "model loaded", "publish v0", "step 1", "trim after step 1", "publish v1",
                          "step 2", "trim after step 2", "publish v2"]
    for name, (rss, peak) in rows.items():
        assert 0 < rss <= peak + 1, (name, rss, peak)  # the peak of a phase is at least where it ends
    assert rows["imports"][0] > 100  # torch is loaded: a real process, not a stub
