"""RLRT vs GRPO on the CPU demo: same recipe, seed and length; per-step reward side by side.

    python bench/demo_compare.py                      # runs both demos, then prints the table
    python bench/demo_compare.py --reuse runs/cmp     # only print, from runs already there

Each method runs as `rlrt demo --method M --run-dir <dir>/M` (all four services as local
processes), one after the other so they do not share the CPU. Prints, per learner step,
the training reward and response length of both runs, then wall time, the mean reward
of the first and last 5 steps, and the first step whose 3-step mean reward reaches 0.8.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run_demo(method: str, run_dir: Path, steps: int | None) -> float:
    cmd = [sys.executable, "-m", "services.cli.main", "demo", "--method", method, "--run-dir", str(run_dir)]
    if steps:
        cmd += ["--steps", str(steps)]
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    (run_dir / "wall_s.txt").write_text(f"{wall:.1f}\n")
    return wall


def load(run_dir: Path) -> tuple[list[dict], float | None]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    wall = run_dir / "wall_s.txt"
    return rows, float(wall.read_text()) if wall.exists() else None


def first_reaching(rewards: list[float], level: float, window: int = 3) -> int | None:
    for i in range(window - 1, len(rewards)):
        if sum(rewards[i - window + 1: i + 1]) / window >= level:
            return i + 1
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("runs/compare"))
    ap.add_argument("--reuse", type=Path, default=None, help="print from existing <dir>/<method> runs")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--methods", default="rlrt,grpo")
    args = ap.parse_args()
    methods = args.methods.split(",")
    base = args.reuse or args.dir
    if args.reuse is None:
        for m in methods:
            run_demo(m, base / m, args.steps)
    runs = {m: load(base / m) for m in methods}
    n = max(len(r[0]) for r in runs.values())
    print("step | " + " | ".join(f"{m} reward  {m} length" for m in methods))
    for i in range(n):
        cells = []
        for m in methods:
            rows = runs[m][0]
            cells.append(f"{rows[i]['reward/mean']:.3f}  {rows[i]['length/mean']:.1f}" if i < len(rows) else "-")
        print(f"{i + 1:4d} | " + " | ".join(cells))
    for m in methods:
        rows, wall = runs[m]
        rw = [r["reward/mean"] for r in rows]
        k = min(5, len(rw))
        reach = first_reaching(rw, 0.8)
        print(f"{m}: steps {len(rw)}, wall {wall if wall is None else f'{wall:.0f} s'}, "
              f"reward first {k} {sum(rw[:k]) / k:.3f} -> last {k} {sum(rw[-k:]) / k:.3f}, "
              f"3-step mean >= 0.8 first at step {reach}")


if __name__ == "__main__":
    main()
