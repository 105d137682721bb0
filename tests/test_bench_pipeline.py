"""bench/pipeline.py: the ratio/refusal logic on given figures, and a real tiny run whose
printed table must parse with sane numbers."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
bp = importlib.util.module_from_spec(spec)
sys.modules["bench_pipeline"] = bp
spec.loader.exec_module(bp)


def result(name: str, tps: float, foreign: float, rep: int = 0, spm: float = 6.0) -> "bp.RunResult":
    return bp.RunResult(setup=name, repeat=rep, steps=3, window_s=30.0, tokens_per_s=tps, steps_per_min=spm,
                        learner_busy=0.8, learner_idle=0.1, rollout_busy=0.5, teacher_busy=0.1,
                        bound_tokens_per_s=tps / 0.8, slowest_stage="learner",
                        peak_rss_mib={"learner-0": 1000.0, "rollout-0": 500.0, "rollout-1": 400.0},
                        foreign_cores=foreign, loadavg_max=1.0, learner_step_s=48.0 / spm)


SETUPS = [bp.Setup("a", {}), bp.Setup("b", {})]


def test_quiet_box_prints_median_ratio_and_rss_per_service_kind():
    rows = bp.parse_table(bp.table(SETUPS, [result("a", 10, 0.0), result("b", 30, 0.05, spm=8.0),
                                            result("a", 20, 0.0, 1), result("b", 40, 0.1, 1, spm=10.0)], max_foreign=0.2))
    assert [r["config"] for r in rows] == ["a", "b"]
    assert rows[0]["vs first"] == "1.00x" and rows[0]["steps vs first"] == "1.00x"
    assert rows[1]["vs first"] == "2.33x"  # median 35 / median 15
    # tokens per step differ between configurations, so the step rate has its own ratio
    assert rows[1]["steps vs first"] == "1.50x"  # median 9 / 6
    assert rows[0]["learner s/step"] == "8.0" and rows[1]["learner s/step"] == "5.4"  # median of 6.0 and 4.8
    assert rows[1]["tok/s"] == "35.0 [30.0-40.0]"
    assert rows[0]["of bound"] == "0.80"
    assert rows[0]["peak RSS MiB"] == "learner 1000 rollout 900 total 1900"


@pytest.mark.parametrize("busy", ["a", "b"])
def test_busy_box_refuses_the_ratio_and_says_why(busy):
    text = bp.table(SETUPS, [result("a", 10, 0.9 if busy == "a" else 0.0), result("b", 30, 0.9 if busy == "b" else 0.0)],
                    max_foreign=0.2)
    rows = bp.parse_table(text)
    assert rows[1]["vs first"] == "refused: box busy" and rows[1]["steps vs first"] == "refused: box busy"
    assert "box was busy with something else" in text and "0.90 cores" in text


@pytest.mark.slow
def test_tiny_recipe_run_prints_a_sane_table(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "pipeline.py"), "--recipe", str(ROOT / "configs" / "tiny.yaml"),
                          "--steps", "4", "--repeats", "1", "--suite", "workers", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = bp.parse_table(out.stdout)
    assert [r["config"] for r in rows] == ["1 rollout worker", "2 rollout workers"]
    for r in rows:
        tps = float(r["tok/s"])
        assert tps > 0
        assert 0 < float(r["steps/min"]) < 6000
        for col in ("learner busy", "learner idle", "rollout busy", "of bound"):
            assert 0.0 <= float(r[col]) <= 1.05, (col, r[col])
        bound, slowest = r["bound tok/s (slowest)"].split()
        assert float(bound) > 0 and slowest in ("(learner)", "(rollout)", "(teacher)")
        # a step's learner time is its busy share of the window over the steps in it
        assert 0 < float(r["learner s/step"]) <= float(r["learner busy"]) * 60 / float(r["steps/min"]) * 1.05 + 0.1
        rss = r["peak RSS MiB"].split()
        kinds = dict(zip(rss[::2], map(float, rss[1::2])))
        assert {"learner", "rollout", "teacher", "verifier", "redis", "total"} <= set(kinds)
        assert 100 < kinds["learner"] < 8000 and kinds["total"] >= kinds["learner"] + kinds["rollout"]
        if r is rows[0]:
            assert r["vs first"] in ("1.00x", "refused: box busy")
        else:
            assert re.fullmatch(r"\d+\.\d\dx", r["vs first"]) or r["vs first"] == "refused: box busy"
    # two workers: the peak RSS of both is counted
    assert float(rows[1]["peak RSS MiB"].split("rollout ")[1].split()[0]) > float(rows[0]["peak RSS MiB"].split("rollout ")[1].split()[0]) * 1.5


def test_a_failed_first_configuration_leaves_no_ratio():
    rows = bp.parse_table(bp.table(SETUPS, [result("b", 30, 0.0)], max_foreign=0.2))
    assert [r["config"] for r in rows] == ["b"]
    assert rows[0]["vs first"] == rows[0]["steps vs first"] == "n/a: no run of the first configuration"


def test_box_load_counts_descendants_as_own_and_an_orphan_as_foreign():
    """BoxLoad is what bench/pipeline.py and bench/methods.py refuse or qualify their figures by:
    a child's CPU is the bench's own; a process that is not a descendant (here a busy loop whose
    parent shell exited, so init adopted it) is foreign load."""
    burn = [sys.executable, "-c", "import time\nwhile time.process_time() < 1.5: pass"]  # 1.5 CPU-seconds
    box = bp.BoxLoad()
    child = subprocess.Popen(burn)
    while child.poll() is None:
        box.tick()
        time.sleep(0.05)
    assert sum(box.own_cpu[p] - box.own_cpu0[p] for p in box.own_cpu) / bp.CLK_TCK > 1.0
    assert child.pid in box.own_cpu

    box = bp.BoxLoad()
    pid = int(subprocess.run(["sh", "-c", f"{shlex.join(burn)} >/dev/null 2>&1 & echo $!"], check=True,
                             capture_output=True, text=True).stdout)
    while Path(f"/proc/{pid}").exists():
        box.tick()
        time.sleep(0.05)
    assert pid not in box.own_cpu
    assert box.foreign_cores() * (time.time() - box.t0) > 1.0
    assert len(box.load) >= 5
