"""What a person sees of a run without a terminal (CI logs, nohup, a pipe, a pod's log):
one plain line per learner step, then the summary; on a terminal the live table stays."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from rlrt_core.config import load_config
from services.launcher import read_metrics
from services.progress import LiveView, PlainProgress, progress_view, step_line

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^step (\d+)/(\d+)  version (\d+)  reward (\S+)  length (\S+)  staleness (\S+)  "
                  r"tokens/s (\S+)  wait (\S+)s$")


def _expected(row: dict) -> tuple:
    return (str(row["step"]), str(row["version"]), f"{row['reward/mean']:.3f}", f"{row['length/mean']:.1f}",
            f"{row['staleness/mean']:.2f}", f"{row['tokens/per_s']:.0f}", f"{row['time/wait_data_s']:.1f}")


@pytest.mark.slow
def test_piped_tiny_demo_prints_one_line_per_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("RLRT__")}
    env.pop("FORCE_COLOR", None)
    proc = subprocess.run([sys.executable, "-m", "services.cli.main", "demo", "--tiny", "--steps", "2",
                           "--run-dir", str(run_dir)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    matches = [m for m in map(LINE.match, out.splitlines()) if m]
    assert len(matches) == 2, out
    for m, row in zip(matches, rows):
        assert m.group(2) == "2"
        assert (m.group(1), *m.groups()[2:]) == _expected(row)
    # no frozen live-view frame, and the end summary follows the step lines
    assert "in flight" not in out and "processes:" not in out, out
    summary = out.index("summary of")
    assert summary > out.index(matches[-1].group(0))
    assert re.search(r"│ steps\s+│\s+2 │", out), out
    assert re.search(r"│ final version\s+│\s+2 │", out), out


def _fake_row(step: int) -> dict:
    return {"step": step, "version": step + 3, "reward/mean": 0.125 * step, "length/mean": 10.25,
            "staleness/mean": 0.5, "tokens/per_s": 1234.4, "time/wait_data_s": 2.26}


def test_plain_progress_prints_new_rows_once_and_skips_rows_of_a_resumed_run(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", use_env=False, overrides={"learner": {"total_steps": 5}})
    run = SimpleNamespace(run_dir=tmp_path, cfg=cfg)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(_fake_row(1)) + "\n")  # from before the resume
    buf = io.StringIO()
    with PlainProgress(run, Console(file=buf)) as view:
        view.update(run)
        assert buf.getvalue() == ""
        with metrics.open("a") as fh:
            fh.write(json.dumps(_fake_row(2)) + "\n" + json.dumps(_fake_row(3)) + "\n")
        view.update(run)
        view.update(run)
        with metrics.open("a") as fh:
            fh.write(json.dumps(_fake_row(4)) + "\n")
    assert buf.getvalue().splitlines() == [
        "step 2/5  version 5  reward 0.250  length 10.2  staleness 0.50  tokens/s 1234  wait 2.3s",
        "step 3/5  version 6  reward 0.375  length 10.2  staleness 0.50  tokens/s 1234  wait 2.3s",
        "step 4/5  version 7  reward 0.500  length 10.2  staleness 0.50  tokens/s 1234  wait 2.3s",
    ]


def test_step_line_shows_missing_fields_as_dashes() -> None:
    assert step_line({"step": 7}) == "step 7  version -  reward -  length -  staleness -  tokens/s -  wait -"


def test_progress_view_is_the_live_table_only_on_a_terminal(tmp_path: Path) -> None:
    run = SimpleNamespace(run_dir=tmp_path, cfg=None)
    assert isinstance(progress_view(run, Console(file=io.StringIO(), force_terminal=True)), LiveView)
    assert isinstance(progress_view(run, Console(file=io.StringIO())), PlainProgress)
