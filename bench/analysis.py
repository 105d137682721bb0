"""Run time and outputs of every `rlrt analyze` sub-command on SmolLM2-135M-Instruct.

Runs each sub-command as a real process on the built-in arithmetic data (1-digit sums, the
demo's task) against a base model and a trained run directory (e.g. the checkpoints left by
`rlrt demo --steps 10 --run-dir /tmp/h15-demo`), and prints one row per sub-command: sizes,
wall-clock and CPU seconds (the CLI and its verifier workers) and the headline numbers of its report.json.

    .venv/bin/python bench/analysis.py --run-dir /tmp/h15-demo [--out /tmp/analysis-bench]
                                       [--docs docs/figures] [--only heatmap,shift]

With --docs, the heat-map, the Fig. 3, Fig. 6 and Fig. 7 panels are copied there (the figures in docs/analysis.md).
On a shared box run it as `nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python bench/analysis.py ...`:
torch's default two threads per process contend with the other jobs. At the sizes below,
markers, reflection and shift each took 3-9 min wall on the shared 2-core dev box, the
heat-map 1-4 min (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "smollm2-135m-instruct"


def commands(run_dir: Path, ckpt: Path, out: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argument list, what the sizes mean)."""
    return {
        "heatmap": (["heatmap", "--model", str(ckpt), "--num-problems", "4", "--samples", "8", "--rollouts", "4",
                     "--critical", "3", "--out", str(out / "heatmap")],
                    "4 problems x 8 samples, 4 rollouts scored in full (V = 49152)"),
        "markers": (["markers", "--model", BASE, "--num-problems", "48", "--samples", "8", "--min-count", "10",
                     "--max-new-tokens", "32", "--out", str(out / "markers")],
                    "48 problems x 8 samples (<= 32 new tokens), 1 right + 1 wrong kept per problem, min count 10"),
        "reflection": (["reflection", "--checkpoints", str(run_dir), "--num-problems", "40", "--max-rollouts", "24",
                        "--max-new-tokens", "32", "--out", str(out / "reflection")],
                       "base + each checkpoint: 40 problems x 8 samples, <= 24 rollouts per subset x 3 sites, "
                       "<= 32 new tokens"),
        "shift": (["shift", "--base", BASE, "--ft", str(ckpt), "--num-problems", "24", "--hard-prompts", "12",
                   "--ft-rollouts", "2", "--max-new-tokens", "32", "--out", str(out / "shift")],
                  "24 problems screened x 8 base samples, <= 12 hard prompts x 2 ft rollouts, <= 32 new tokens"),
    }


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def headline(name: str, doc: dict) -> str:
    if name == "heatmap":
        s = doc["summary"]
        return (f"{s['positions']} positions, D̄ p50 {s['d_bar_p50']:.3g} p99 {s['d_bar_p99']:.3g} max "
                f"{s['d_bar_max']:.3g} nats, accuracy {s['accuracy']:.2f}")
    if name == "markers":
        return (f"{doc['trajectories']} trajectories, {doc['positions']} positions, markers "
                f"{doc['n_markers']['explore']} explore / {doc['n_markers']['exploit']} exploit")
    if name == "reflection":
        parts = []
        for m in doc["models"]:
            r = m["rates"]["flip_to_R"]
            rates = "/".join("-" if r[s]["rate"] is None else f"{r[s]['rate']:.2f}" for s in ("max_kl", "random", "min_kl"))
            parts.append(f"step {m['step']}: acc {m['accuracy']:.2f}, hard {m['subsets'].get('hard', 0)}, "
                         f"flip->R max/rand/min {rates} (n={r['max_kl']['n']})")
        return "; ".join(parts)
    s = doc["summary"]
    ov = "-" if s["overlap_at_20"] is None else f"{s['overlap_at_20']:.2f}"
    return (f"{s['positions']} positions, JS>0.1 at {s['high_fraction']:.1%}, overlap@20 {ov}, "
            f"base acc {s['base_accuracy']:.2f}, ft acc on hard {s['ft_accuracy_on_chosen']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True, help="a trained run directory with checkpoints/")
    ap.add_argument("--out", type=Path, default=Path("/tmp/analysis-bench"))
    ap.add_argument("--docs", type=Path, default=None, help="copy the figures of docs/analysis.md here")
    ap.add_argument("--only", default="", help="comma-separated sub-commands (default: all)")
    args = ap.parse_args()
    ckpts = sorted((args.run_dir / "checkpoints").glob("step_*"))
    if not ckpts:
        sys.exit(f"{args.run_dir} has no checkpoints/step_*")
    ckpt = ckpts[-1]
    cmds = commands(args.run_dir, ckpt, args.out)
    only = [c for c in args.only.split(",") if c] or list(cmds)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}; base {BASE}, trained {ckpt}")
    rows = []
    for name in only:
        argv, sizes = cmds[name]
        t0 = time.perf_counter()
        cpu0 = _children_cpu()
        p = subprocess.run([sys.executable, "-m", "services.cli.main", "analyze", *argv], cwd=REPO,
                           capture_output=True, text=True, env=dict(os.environ, COLUMNS="120"))
        wall = time.perf_counter() - t0
        cpu = _children_cpu() - cpu0  # the CLI and its verifier workers; robust to other jobs' load
        if p.returncode != 0:
            print(f"{name}: failed ({p.returncode})\n{p.stderr[-2000:]}")
            continue
        out_dir = Path(argv[argv.index("--out") + 1])
        doc = json.loads((out_dir / "report.json").read_text())
        sizes_kb = {f: (out_dir / f).stat().st_size // 1024 for f in doc["figures"]}
        rows.append((name, sizes, wall, cpu, headline(name, doc), sizes_kb))
        print(f"\n{name}: {sizes}\n  wall {wall:.0f} s (analysis {doc['seconds']:.0f} s after start-up), "
              f"CPU {cpu:.0f} s, load average {os.getloadavg()[0]:.1f}\n"
              f"  {headline(name, doc)}\n  figures (KB): {sizes_kb}", flush=True)
    print("\n| sub-command | sizes | wall s | CPU s | result |\n|---|---|---|---|---|")
    for name, sizes, wall, cpu, head, _ in rows:
        print(f"| {name} | {sizes} | {wall:.0f} | {cpu:.0f} | {head} |")
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        for name, fig, dest in (("heatmap", "heatmap.png", "analysis-heatmap.png"),
                                ("markers", "markers.png", "analysis-markers.png"),
                                ("reflection", "reflection.png", "analysis-reflection.png"),
                                ("shift", "shift.png", "analysis-shift.png")):
            src = args.out / name / fig
            if src.is_file():
                shutil.copy(src, args.docs / dest)
                print(f"copied {src} -> {args.docs / dest}")


if __name__ == "__main__":
    main()
