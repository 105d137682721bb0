"""RLRT vs GRPO in miniature: the same recipe, step budget and seeds, before/after on a held-out split.

    python bench/methods.py                                   # configs/methods-mini.yaml, rlrt + grpo, 3 seeds
    python bench/methods.py --methods rlrt,grpo,rlsd --seeds 0,1,2 --steps 20
    python bench/methods.py --recipe configs/tiny.yaml --steps 1 --seeds 0 --eval-problems 4 -k 2   # smoke run

What it does, unattended, in one command:
  1. held-out split: `--eval-problems` arithmetic problems of the recipe's digits/ops drawn with
     another seed, minus every problem the training set holds (by prompt), written as JSONL;
  2. the base model evaluated once on it (`rlrt eval`: K samples per problem, avg@K and unbiased
     pass@k for k = 1..K);
  3. for seed in seeds, for method in methods (interleaved, so slow drifts of the box hit every
     method alike): `rlrt train` of the recipe with that method and seed for `--steps` learner
     steps (every service a local process, a private embedded Redis), then `rlrt eval` of the
     final checkpoint on the same held-out split;
  4. per method, mean ± std over seeds of avg@K and pass@k, the training wall time, and the
     training reward of the last steps; a Markdown table on stdout, every figure in
     `OUT/methods.json`, pass@k curves in `OUT/methods.png`.

Whatever the outcome, the numbers are reported as measured: the bench never picks seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlrt_core.config import load_config  # noqa: E402
from rlrt_core.data import arithmetic_problems  # noqa: E402
from rlrt_core.methods import method_names  # noqa: E402
from bench.pipeline import BoxLoad  # noqa: E402
from services.launcher import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RLRT = [sys.executable, "-m", "services.cli.main"]


def heldout_split(cfg, n: int, seed: int) -> list[dict[str, str]]:
    """`n` problems of the recipe's arithmetic kind that the training set does not hold.

    Drawn with `seed` (never the training seed) and filtered by prompt, so a memorised training
    answer cannot count as held-out success. Raises when the kind has too few distinct problems
    (1-digit sums: 100 in all, every one of them in a 5 000-problem training set)."""
    a = cfg.data.arithmetic
    if cfg.data.source != "arithmetic":
        raise SystemExit("bench/methods.py builds its held-out split from arithmetic recipes "
                         f"(data.source is {cfg.data.source!r})")
    if seed == a.seed:
        raise SystemExit(f"--heldout-seed must differ from the training seed ({a.seed})")
    train = {p.prompt for p in arithmetic_problems(digits=a.digits, ops=a.ops, num_problems=a.num_problems,
                                                    seed=a.seed, instruction=None)}
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    pool = arithmetic_problems(digits=a.digits, ops=a.ops, num_problems=50 * n, seed=seed, instruction=None)
    for p in pool:
        if p.prompt in train or p.prompt in seen:
            continue
        seen.add(p.prompt)
        out.append({"id": f"heldout-{len(out)}", "prompt": p.prompt, "answer": p.answer, "solution": p.solution})
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} held-out problems exist outside the {len(train)} training prompts "
                     f"({a.digits}-digit {''.join(a.ops)}); use more digits or fewer training problems")


def run_logged(cmd: list[str], log: Path, timeout_s: float) -> float:
    """Run `cmd` with output to `log`; seconds taken. A failure names the log."""
    t0 = time.monotonic()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout_s,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-30:])
        raise SystemExit(f"{' '.join(cmd[2:5])}... failed (exit {rc}); log {log}:\n{tail}")
    return time.monotonic() - t0


def evaluate(model: str, recipe: Path, mode: str, data: Path, k: int, max_new_tokens: int, out_json: Path,
             log: Path, seed: int, timeout_s: float) -> dict[str, Any]:
    """`rlrt eval` of `model` on the held-out file (the recipe's instruction and answer extraction,
    pass@k for every k = 1..K); the data set's report (avg_at_k, pass_at_k, outcomes...)."""
    cmd = RLRT + ["eval", "--model", model, "--config", str(recipe), "--data", str(data), "-k", str(k),
                  "--pass-at", ",".join(str(i) for i in range(1, k + 1)), "--mode", mode,
                  "--max-new-tokens", str(max_new_tokens), "--seed", str(seed), "--json", str(out_json)]
    secs = run_logged(cmd, log, timeout_s)
    rep = json.loads(out_json.read_text())["datasets"][0]
    rep["eval_s"] = secs
    return rep


def train(recipe: Path, method: str, seed: int, steps: int, run_dir: Path, log: Path,
          timeout_s: float) -> tuple[float, list[dict[str, Any]], Path]:
    """`rlrt train` of the recipe with `method` and `seed`: (seconds, metrics rows, final checkpoint)."""
    overrides = {"seed": seed, "run_name": f"methods-{method}-s{seed}",
                 "algorithm": {"method": method},
                 "learner": {"total_steps": steps, "checkpoint_every": steps},
                 "metrics": {"run_dir": str(run_dir)},
                 "transport": {"redis_url": None}}  # a private embedded Redis per run
    cfg = load_config(recipe, overrides=overrides, use_env=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    secs = run_logged(RLRT + ["train", "--config", str(cfg_path)], log, timeout_s)
    rows = read_metrics(run_dir)
    ckpt = run_dir / "checkpoints" / f"step_{steps:06d}"
    if not ckpt.is_dir():
        raise SystemExit(f"{method} seed {seed}: no checkpoint at {ckpt}; log {log}")
    return secs, rows, ckpt


def _ms(xs: list[float], fmt: str = ".3f") -> str:
    """mean ± sample std over seeds (the value alone for one seed)."""
    if not xs:
        return "–"
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)} ± {format(statistics.stdev(xs), fmt)}"


def summarise(base: dict[str, Any], runs: list[dict[str, Any]], methods: list[str], k: int) -> str:
    """Markdown: base, then per method mean ± std over seeds of avg@k, pass@1/k, Δ avg@k, train time."""
    ks = sorted(int(x) for x in base["pass_at_k"])
    head = f"| model | seeds | avg@{k} | " + " | ".join(f"pass@{x}" for x in ks) + f" | Δ avg@{k} vs base | train s | reward (last 3 steps) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines.append(f"| base | – | {base['avg_at_k']:.3f} | " + " | ".join(f"{base['pass_at_k'][str(x)]:.3f}" for x in ks)
                 + " | – | – | – |")
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        avg = [r["eval"]["avg_at_k"] for r in rs]
        cells = [_ms([r["eval"]["pass_at_k"][str(x)] for r in rs]) for x in ks]
        lines.append(f"| {m} | {','.join(str(r['seed']) for r in rs)} | {_ms(avg)} | " + " | ".join(cells)
                     + f" | {_ms([a - base['avg_at_k'] for a in avg])} | {_ms([r['train_s'] for r in rs], '.0f')}"
                     + f" | {_ms([r['final_reward'] for r in rs])} |")
    return "\n".join(lines)


def plot(base: dict[str, Any], runs: list[dict[str, Any]], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(x) for x in base["pass_at_k"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(ks, [base["pass_at_k"][str(x)] for x in ks], "k--", marker="o", label="base")
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        per_k = [[r["eval"]["pass_at_k"][str(x)] for r in rs] for x in ks]
        mean = [statistics.mean(v) for v in per_k]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_k]
        ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=f"{m} ({len(rs)} seeds)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (held-out)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs" / "methods-mini.yaml")
    ap.add_argument("--methods", default="rlrt,grpo", help="comma-separated registered methods")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None, help="learner steps per run (default: the recipe's)")
    ap.add_argument("--eval-problems", type=int, default=40)
    ap.add_argument("-k", "--samples", type=int, default=8, help="samples per held-out problem")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the recipe's rollout.max_new_tokens")
    ap.add_argument("--heldout-seed", type=int, default=1_000_003)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-methods")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per train or eval call")
    args = ap.parse_args(argv)

    recipe = args.recipe.resolve()
    cfg = load_config(recipe, use_env=False)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; registered: {sorted(method_names())}")
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = args.steps or cfg.learner.total_steps
    mnt = args.max_new_tokens or cfg.rollout.max_new_tokens
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    # The 90-minute goal is a wall time: record what else used the box meanwhile.
    box, stop = BoxLoad(), threading.Event()

    def watch() -> None:
        while not stop.wait(1.0):
            box.tick()

    threading.Thread(target=watch, name="box-load", daemon=True).start()

    held = heldout_split(cfg, args.eval_problems, args.heldout_seed)
    data = out / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in held))
    print(f"recipe {recipe.name}: {cfg.model.path}, {cfg.data.arithmetic.digits}-digit "
          f"{''.join(cfg.data.arithmetic.ops)}; methods {methods}; seeds {seeds}; {steps} steps; "
          f"held-out {len(held)} problems x {args.samples} samples", flush=True)

    base = evaluate(cfg.model.path, recipe, cfg.verifier.mode, data, args.samples, mnt, out / "eval-base.json",
                    out / "eval-base.log", 0, args.timeout)
    print(f"base: avg@{args.samples} {base['avg_at_k']:.3f} ({base['eval_s']:.0f} s)", flush=True)

    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for m in methods:
            name = f"{m}-s{seed}"
            train_s, rows, ckpt = train(recipe, m, seed, steps, out / name, out / f"train-{name}.log", args.timeout)
            ev = evaluate(str(ckpt), recipe, cfg.verifier.mode, data, args.samples, mnt, out / f"eval-{name}.json",
                          out / f"eval-{name}.log", seed, args.timeout)
            rewards = [float(r["reward/mean"]) for r in rows if "reward/mean" in r]
            runs.append({"method": m, "seed": seed, "train_s": train_s, "eval": ev,
                         "final_reward": statistics.mean(rewards[-3:]) if rewards else float("nan"),
                         "reward_curve": rewards})
            print(f"{name}: train {train_s:.0f} s, reward {rewards[:1]} -> {rewards[-1:]}, held-out "
                  f"avg@{args.samples} {ev['avg_at_k']:.3f} ({ev['eval_s']:.0f} s)", flush=True)
            (out / "methods.json").write_text(json.dumps({"base": base, "runs": runs}, indent=1))

    total = time.monotonic() - t_start
    stop.set()
    load = {"foreign_cores": round(box.foreign_cores(), 3), "loadavg_max": max(box.load, default=0.0),
            "cores": os.cpu_count()}
    (out / "methods.json").write_text(json.dumps({"recipe": str(recipe), "steps": steps, "k": args.samples,
                                                  "heldout_problems": len(held), "base": base, "runs": runs,
                                                  "total_s": total, "box": load}, indent=1))
    plot(base, runs, methods, out / "methods.png")
    print()
    print(summarise(base, runs, methods, args.samples))
    print(f"\nwhole bench: {total / 60:.1f} min on {load['cores']} cores, while other processes used "
          f"{load['foreign_cores']:.2f} cores on average (load average up to {load['loadavg_max']:.1f}); "
          f"figures in {out / 'methods.json'}, {out / 'methods.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
