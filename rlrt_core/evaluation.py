"""Evaluation: avg@k and unbiased pass@k (Chen et al., 2021) from n samples per problem.

With n samples of which c are correct, the unbiased estimate of the chance that at least
one of k samples (drawn without replacement from the n) is correct is

    pass@k = 1 - C(n - c, k) / C(n, k)

computed as the running product 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms
the (huge) binomials. avg@k is the mean reward over all samples, i.e. the expected
pass@1. `evaluate` samples k completions per problem from an engine and verifies them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from rlrt_core.data import Problem
from rlrt_core.reward import OUTCOMES, Verifier

if TYPE_CHECKING:
    from rlrt_core.engines import Engine


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples with `c` correct: 1 - C(n-c, k) / C(n, k)."""
    if n < 1:
        raise ValueError(f"pass@k needs n >= 1 samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"correct count c={c} must lie in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, n={n}] (cannot estimate pass@{k} from {n} samples)")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(rewards: Sequence[Sequence[float]]) -> float:
    """Mean reward over all samples: `rewards[p][j]` is sample j of problem p (each problem
    weighted equally, so problems with different sample counts do not skew it)."""
    if not rewards:
        raise ValueError("avg@k of no problems")
    means = []
    for p, row in enumerate(rewards):
        if len(row) == 0:
            raise ValueError(f"problem {p} has no samples")
        means.append(sum(row) / len(row))
    return sum(means) / len(means)


def pass_at_k_curve(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over problems for every k in `ks`; `counts` holds (n, c) per problem."""
    counts = list(counts)
    if not counts:
        raise ValueError("pass@k of no problems")
    return {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}


def default_pass_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def parse_ks(spec: str, n: int) -> list[int]:
    """"1,2,4" -> [1, 2, 4]; every k must lie in [1, n] (ValueError names the bad values)."""
    try:
        ks = sorted({int(x) for x in spec.replace(" ", "").split(",") if x})
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {spec!r}") from None
    if not ks:
        raise ValueError("no k values given")
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"k values {bad} outside [1, {n}]: pass@k needs k <= the {n} samples per problem")
    return ks


@dataclass
class ProblemResult:
    id: str
    n: int
    correct: int
    rewards: list[float]
    extracted: list[str | None]
    truncated: int  # completions that hit max_new_tokens
    texts: list[str] | None = None  # the completions themselves (evaluate(keep_texts=True))


@dataclass
class EvalReport:
    """Results of one data set: avg@k, pass@k curve, outcome counts, per-problem rows."""

    dataset: str
    k: int
    num_problems: int
    avg_at_k: float
    pass_at_k: dict[int, float]
    outcomes: dict[str, int]
    truncated_frac: float
    seconds: float
    completions_per_s: float
    problems: list[ProblemResult] = field(default_factory=list)

    def to_dict(self, *, per_problem: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["pass_at_k"] = {str(k): v for k, v in self.pass_at_k.items()}
        if not per_problem:
            d.pop("problems")
        return d


def report_from_results(dataset: str, k: int, results: Sequence[ProblemResult], outcomes: Counter[str],
                        pass_ks: Sequence[int], seconds: float) -> EvalReport:
    """Aggregate per-problem results into an `EvalReport`."""
    total = sum(r.n for r in results)
    return EvalReport(
        dataset=dataset, k=k, num_problems=len(results),
        avg_at_k=avg_at_k([r.rewards for r in results]),
        pass_at_k=pass_at_k_curve([(r.n, r.correct) for r in results], pass_ks),
        outcomes={o: outcomes.get(o, 0) for o in OUTCOMES},
        truncated_frac=sum(r.truncated for r in results) / total if total else 0.0,
        seconds=seconds, completions_per_s=total / seconds if seconds > 0 else 0.0,
        problems=list(results),
    )


def evaluate(engine: "Engine", problems: Sequence[Problem], verifier: Verifier, *, k: int,
             pass_ks: Sequence[int] | None = None, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 8, dataset: str = "data",
             prompt_template: str | None = None, keep_texts: bool = False,
             on_progress: Callable[[int], None] | None = None) -> EvalReport:
    """Sample `k` completions per problem (student prompt, chat template) and verify them.

    Problems go to the engine `batch_size` at a time (one `generate` call, n=k each);
    `on_progress(m)` is called after each batch with the number of problems it finished;
    `keep_texts` keeps every completion's text in the per-problem results.
    The sampling seed of a batch is `seed + index of its first problem`, so a run is
    reproducible whatever the batch size of a deterministic engine."""
    from rlrt_core.engines import SamplingParams
    from rlrt_core.prompts import student_prompt_ids

    if not problems:
        raise ValueError(f"data set {dataset!r} has no problems")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pass_ks = list(pass_ks) if pass_ks is not None else default_pass_ks(k)
    parse_ks(",".join(map(str, pass_ks)), k)  # validates the range
    tok = engine.tokenizer
    results: list[ProblemResult] = []
    outcomes: Counter[str] = Counter()
    t0 = time.perf_counter()
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        prompts = [student_prompt_ids(tok, p.prompt, template=prompt_template) for p in batch]
        sampling = SamplingParams(n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                  seed=seed + start)
        generations = engine.generate(prompts, sampling)
        if len(generations) != len(batch):
            raise RuntimeError(f"engine returned {len(generations)} results for {len(batch)} prompts")
        texts = [c.text for g in generations for c in g.completions]
        answers = [p.answer for p, g in zip(batch, generations) for _ in g.completions]
        verdicts = verifier.verify(texts, answers)
        outcomes.update(v.outcome for v in verdicts)
        pos = 0
        for p, g in zip(batch, generations):
            vs = verdicts[pos:pos + len(g.completions)]
            pos += len(g.completions)
            if len(vs) != k:
                raise RuntimeError(f"engine returned {len(vs)} completions for problem {p.id}, expected {k}")
            rewards = [v.reward for v in vs]
            results.append(ProblemResult(
                id=p.id, n=len(vs), correct=sum(1 for r in rewards if r > 0.5), rewards=rewards,
                extracted=[v.extracted for v in vs],
                truncated=sum(1 for c in g.completions if c.finish_reason == "length"),
                texts=[c.text for c in g.completions] if keep_texts else None))
        if on_progress is not None:
            on_progress(len(batch))
    return report_from_results(dataset, k, results, outcomes, pass_ks, time.perf_counter() - t0)
