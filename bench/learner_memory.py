"""Where the learner's memory goes: RSS and peak RSS after each phase of a learner's life.

    python bench/learner_memory.py                          # demo recipe and model, 2 steps
    python bench/learner_memory.py --micro-batch-size 32    # the demo's micro-batch before this bench
    python bench/learner_memory.py --model tiny --steps 1   # smoke run

Runs in this process what the learner service runs, on the recipe's model and learner
settings: load the model, publish version 0 into a `WeightServer` (the serving buffer), then
per step `PolicyLearner.step` on synthetic groups of the demo's shape (`--groups` x `--samples`,
40-token prompts shared by a group, 5-24-token responses, mixed rewards, teacher log-probs),
`rlrt_core.heap.trim()` (as the learner loop does) and the next publish. After each phase it
prints VmRSS and the peak VmHWM reached during that phase (the peak is reset between phases
through /proc/self/clear_refs), read from /proc/self/status. Linux only. Recorded in
docs/BENCHMARKS.md ("Memory of the CPU demo").
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def _status() -> tuple[int, int]:
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            got[key] = int(value.split()[0]) // 1024
    return got["VmRSS"], got["VmHWM"]


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def synthetic_groups(rng: random.Random, vocab: int, n_groups: int, n_samples: int) -> list:
    """`n_groups` TrainGroups of the demo's shape: a 40-token prompt shared by the group's
    `n_samples` samples, 5-24-token responses, rewards 1 on every third sample, student and
    teacher log-probs (-2.0 / -1.5) so RLRT's token weights are computed."""
    from rlrt_core.learner import TrainGroup, TrainSample

    out = []
    for g in range(n_groups):
        prompt = [rng.randrange(vocab) for _ in range(40)]
        samples = []
        for k in range(n_samples):
            n = rng.randint(5, 24)
            samples.append(TrainSample(prompt_ids=prompt, response_ids=[rng.randrange(vocab) for _ in range(n)],
                                       behavior_logprobs=[-2.0] * n, reward=float(k % 3 == 0),
                                       student_logprobs=[-2.0] * n, teacher_logprobs=[-1.5] * n))
        out.append(TrainGroup(f"g{g}", 0, samples))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--model", default=None, help="model.path override (e.g. tiny)")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="learner.micro_batch_size override")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--no-trim", action="store_true", help="leave glibc's heap as it is (no malloc_trim)")
    args = ap.parse_args(argv)

    from rlrt_core import heap

    heap.limit_arenas(2)  # as `rlrt serve` does
    _reset_peak()
    rows: list[tuple[str, int, int]] = []

    def phase(name: str) -> None:
        rss, peak = _status()
        rows.append((name, rss, peak))
        print(f"| {name} | {rss} MiB | {peak} MiB |", flush=True)
        _reset_peak()

    print("| phase | RSS after | peak in phase |\n|---|---:|---:|", flush=True)
    from rlrt_core.config import load_config
    from rlrt_core.learner import PolicyLearner
    from rlrt_core.models import load_model
    from rlrt_core.weights.server import WeightServer

    over: dict = {"learner": {}}
    if args.model:
        over["model"] = {"path": args.model}
    if args.micro_batch_size:
        over["learner"]["micro_batch_size"] = args.micro_batch_size
    cfg = load_config(args.recipe, overrides=over, use_env=False)
    phase("imports (torch, transformers)")
    model = load_model(cfg.model.path, dtype=cfg.model.dtype)
    phase("model loaded")
    server = WeightServer(token="bench", keep_versions=cfg.transport.keep_versions)
    dtype = cfg.weights_publish_dtype()
    server.publish(0, model.state_dict(), dtype=dtype)
    server.checksum(0)
    phase("publish v0 (serving buffer)")
    learner = PolicyLearner(model, cfg.learner, cfg.algorithm, temperature=cfg.rollout.temperature)
    vocab = learner.vocab_size
    rng = random.Random(0)

    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        learner.step(synthetic_groups(rng, vocab, args.groups, args.samples))
        phase(f"step {step} ({time.perf_counter() - t0:.0f} s)")
        if not args.no_trim:
            heap.trim()
            phase(f"trim after step {step}")
        server.publish(step, model.state_dict(), dtype=dtype)
        server.checksum(step)
        phase(f"publish v{step}")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
