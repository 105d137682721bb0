"""The learner's step, A/B in one process: what the demo's step cost when the issue was filed
against what it costs now, on the same model, the same batches, interleaved.

    python bench/learner_step.py                      # demo recipe and model, 3 repeats
    python bench/learner_step.py --model tiny --repeats 1 --groups 2 --samples 4   # smoke run

Configurations (each its own `PolicyLearner` on one shared model, so each has its own AdamW
state; they run one after another on the same synthetic batch in every repeat, A B C A B C):

  before   a separate no-grad π_old pass over every sequence, then the step, micro-batch 32:
           the demo's learner when the benchmark issue was filed (the pass is the library's own
           `_old_logprobs`, called on the step's sequences as the step itself called it then)
  detached π_old taken detached from the training forward (the step makes one optimizer
           update), micro-batch 32
  now      the same with the recipe's micro-batch (8 on the demo: less activation memory)

The batch has the demo's shape (`--groups` x `--samples`, 40-token prompts shared by a group,
5-24-token responses, mixed rewards, teacher log-probs; `learner_memory.synthetic_groups`).
A first step per configuration is left out (allocator warm-up). It prints seconds per step
(median [min-max] over repeats), trained (response) tokens per second and the speed-up over
the first configuration. One intra-op thread by default, as the local launcher gives the
learner (`--threads`). Recorded in docs/BENCHMARKS.md ("The learner's step on the CPU demo").
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--model", default=None, help="model.path override (e.g. tiny)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)

    import torch

    from bench.learner_memory import synthetic_groups
    from rlrt_core import heap
    from rlrt_core.config import load_config
    from rlrt_core.learner import PolicyLearner
    from rlrt_core.models import load_model

    torch.set_num_threads(args.threads)
    heap.limit_arenas(2)  # as `rlrt serve` does
    over: dict = {"learner": {"groups_per_step": args.groups, "mini_batch_groups": args.groups, "ppo_epochs": 1}}
    if args.model:
        over["model"] = {"path": args.model}
    cfg = load_config(args.recipe, overrides=over, use_env=False)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype)
    mb_now = cfg.learner.micro_batch_size

    def learner(micro: int) -> PolicyLearner:
        return PolicyLearner(model, cfg.learner.model_copy(update={"micro_batch_size": micro}), cfg.algorithm,
                             temperature=cfg.rollout.temperature)

    setups = [("before: separate π_old pass, micro-batch 32", learner(32), True),
              ("detached π_old, micro-batch 32", learner(32), False),
              (f"now: detached π_old, micro-batch {mb_now}", learner(mb_now), False)]
    vocab = setups[0][1].vocab_size
    rng = random.Random(0)

    def one(lrn: PolicyLearner, separate_old: bool, groups) -> float:
        t0 = time.perf_counter()
        if separate_old:
            samples = [s for g in groups for s in g.samples]
            T = max(len(s.response_ids) for s in samples)
            lrn._old_logprobs([list(s.prompt_ids) for s in samples], [list(s.response_ids) for s in samples], T)
        lrn.step(groups)
        heap.trim()  # as the learner loop does after each step
        return time.perf_counter() - t0

    print(f"torch {torch.__version__}, {args.threads} thread(s); model {cfg.model.path} ({cfg.model.dtype}); "
          f"{args.groups} groups x {args.samples} samples per step; {args.repeats} repeat(s), interleaved", flush=True)
    warm = synthetic_groups(rng, vocab, args.groups, args.samples)
    for name, lrn, sep in setups:
        print(f"  warm-up {name}: {one(lrn, sep, warm):.2f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name, _, _ in setups}
    tokens: list[int] = []
    for rep in range(args.repeats):
        groups = synthetic_groups(rng, vocab, args.groups, args.samples)
        tokens.append(sum(len(s.response_ids) for g in groups for s in g.samples))
        for name, lrn, sep in setups:
            times[name].append(one(lrn, sep, groups))
            print(f"  #{rep + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    tok = statistics.median(tokens)
    first = statistics.median(times[setups[0][0]])
    print("\n| configuration | s/step | trained tok/s | speed-up vs first |\n|---|---|---|---|")
    for name, _, _ in setups:
        t = times[name]
        med = statistics.median(t)
        print(f"| {name} | {med:.2f} [{min(t):.2f}-{max(t):.2f}] | {tok / med:.1f} | {first / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
