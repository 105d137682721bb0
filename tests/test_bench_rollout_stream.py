"""bench/rollout_stream.py on the tiny model: batch and stream interleaved twice, both engines'
rows and the paired ratios printed from measured figures (the SmolLM2 figures are in
docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_batch_and_stream_interleaved_on_the_tiny_model() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "rollout_stream.py"), "--model", "tiny",
                          "--prompts", "4", "--groups", "2", "--samples", "4", "--max-new-tokens", "12",
                          "--modes", "batch,stream", "--repeats", "2"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert [r["mode"] for r in results] == ["batch", "stream", "batch", "stream"]
    for r in results:
        assert r["tokens"] > 0 and r["cpu_s"] > 0 and r["steps"] > 0
        assert sum(map(sum, r["lengths"])) == r["tokens"] and len(r["lengths"]) == 4
    streams = [r for r in results if r["mode"] == "stream"]
    # the same seeds give the same tokens in both repeats; the stream attended over real columns
    assert streams[0]["lengths"] == streams[1]["lengths"] and streams[0]["mean_cache_width"] > 12
    for mode in ("batch", "stream", "batch #2", "stream #2"):
        assert re.search(rf"^\| {mode} \| \d+ \|", out.stdout, re.M), mode
    m = re.search(r"each interleaved pair: ([\d.]+), ([\d.]+); median ([\d.]+)x", out.stdout)
    assert m and float(m.group(3)) > 0
