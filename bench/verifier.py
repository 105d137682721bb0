"""Verifier throughput: completions/s of the timed worker pool vs. in-process checking.

Realistic completions: GSM8K test reference solutions rewritten the way a model ends an
answer (`The answer is \\boxed{X}.`, `The answer is: X`, `#### X`), grouped as rollouts
(K = 8 per problem, half of them with a wrong final number), checked group by group as the
verifier service does. Measured side by side in one run: in-process `math_reward` (one
core, no time limit), and `Verifier` with 1 and 2 workers, in boxed and last_number modes.

    .venv/bin/python bench/verifier.py [--groups 150] [--repeats 3] [--no-gsm8k-count]

It also counts, over all of GSM8K train and test, how many reference solutions (the raw
`answer` text, ending in `#### X`) verify against their own answer, in both modes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlrt_core.config import DataConfig  # noqa: E402
from rlrt_core.data import load_jsonl, load_problems, resolve_data_path  # noqa: E402
from rlrt_core.reward import Verifier, math_reward, summarize  # noqa: E402

K = 8


def make_groups(n_groups: int, seed: int = 0) -> list[tuple[list[str], str]]:
    probs = load_problems(DataConfig(source="jsonl", path="gsm8k-test", instruction=""))
    rng = random.Random(seed)
    groups = []
    for p in rng.sample(probs, n_groups):
        comps = []
        for j in range(K):
            ans = p.answer if j % 2 == 0 else str(rng.randint(0, 999))
            style = rng.randrange(3)
            end = [f"The answer is \\boxed{{{ans}}}.", f"The answer is: {ans}", f"#### {ans}"][style]
            comps.append(f"{p.solution}\n{end}")
        groups.append((comps, p.answer))
    return groups


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds used so far by this process plus the given (worker) processes."""
    total = time.process_time()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_pool(v: Verifier, groups: list[tuple[list[str], str]], *, one_call: bool = False
             ) -> tuple[float, float, dict]:
    """Group by group (what the verifier service does per RolloutGroup), or all in one call.
    Returns (wall s, CPU s of parent + workers, summary)."""
    pids = [w.proc.pid for w in v._workers]
    c0, t0 = _cpu_s(pids), time.perf_counter()
    results = []
    if one_call:
        results = v.verify([c for cs, _ in groups for c in cs], [a for cs, a in groups for _ in cs])
    else:
        for comps, ans in groups:
            results += v.verify_group(comps, ans)
    return time.perf_counter() - t0, _cpu_s(pids) - c0, summarize(results)


def run_inprocess(groups: list[tuple[list[str], str]], mode: str) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    for comps, ans in groups:
        for c in comps:
            math_reward(c, ans, mode=mode)  # type: ignore[arg-type]
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-gsm8k-count", action="store_true")
    args = ap.parse_args()
    groups = make_groups(args.groups)
    n = sum(len(c) for c, _ in groups)
    print(f"machine: {os.cpu_count()} CPUs; {len(groups)} groups x {K} = {n} completions per pass, "
          f"median of {args.repeats} passes; per CPU-s = completions per CPU second of parent + workers "
          f"(per-core throughput, robust to other load)")
    print(f"{'mode':<12} {'setup':<24} {'completions/s':>14} {'per CPU-s':>10} {'vs in-process':>14}  accuracy")
    for mode in ("boxed", "last_number"):
        # The three setups run round-robin within each repeat, so load from other
        # processes on this shared machine hits them alike.
        with Verifier(mode=mode, timeout_s=10.0, workers=1) as v1, \
                Verifier(mode=mode, timeout_s=10.0, workers=2) as v2:  # type: ignore[arg-type]
            setups = {"pool, 1 worker": (v1, False), "pool, 2 workers": (v2, False),
                      "pool, 2 workers, 1 call": (v2, True)}
            for v in (v1, v2):
                run_pool(v, groups[:10])  # warm-up: workers started, caches warm
            times: dict[str, list[float]] = {name: [] for name in ["in-process (1 core)", *setups]}
            cpus: dict[str, list[float]] = {name: [] for name in times}
            acc = {}
            for _ in range(args.repeats):
                dt, cpu = run_inprocess(groups, mode)
                times["in-process (1 core)"].append(dt)
                cpus["in-process (1 core)"].append(cpu)
                for name, (v, one_call) in setups.items():
                    dt, cpu, summary = run_pool(v, groups, one_call=one_call)
                    times[name].append(dt)
                    cpus[name].append(cpu)
                    acc[name] = summary["accuracy"]
        base_rate = n / statistics.median(times["in-process (1 core)"])
        for name, ts in times.items():
            rate = n / statistics.median(ts)
            per_cpu_s = n / statistics.median(cpus[name])
            print(f"{mode:<12} {name:<24} {rate:>14.0f} {per_cpu_s:>10.0f} {rate / base_rate:>13.2f}x  "
                  f"{acc.get(name, float('nan')):.3f}")
    if not args.no_gsm8k_count:
        count_gsm8k()


def count_gsm8k() -> None:
    print("GSM8K reference solutions verifying against their own answer (pool, 2 workers):")
    with Verifier(workers=2, timeout_s=10.0) as v:
        for name in ("gsm8k-train", "gsm8k-test"):
            path = resolve_data_path(name)
            raw = [json.loads(line)["answer"] for line in path.open()]
            answers = [p.answer for p in load_jsonl(path)]
            for mode in ("boxed", "last_number"):
                s = summarize(v.verify(raw, answers, mode=mode))  # type: ignore[arg-type]
                print(f"  {name:<12} {mode:<12} {int(s['correct'])}/{int(s['total'])} correct, "
                      f"{int(s['wrong'])} wrong, {int(s['unparseable'])} unparseable, {int(s['timeout'])} timeouts")


if __name__ == "__main__":
    main()
