"""Whole-pipeline throughput, side by side: async vs sync, RLRT vs GRPO, 1 vs 2 rollout workers.

    python bench/pipeline.py                                   # demo recipe, --suite all
    python bench/pipeline.py --suite async --steps 8 --repeats 2
    python bench/pipeline.py --recipe configs/tiny.yaml --steps 4 --repeats 1   # smoke run

Every configuration of a suite runs as a real `LocalRun` (learner, verifier, teacher, rollout
workers as OS processes, a private embedded Redis, its own run dir), back to back on this box,
interleaved A B C A B C ... for `--repeats` rounds so slow drifts of the machine hit every
configuration alike. Per configuration it prints (median over repeats, [min-max] spread):

  tok/s, steps/min  trained tokens and learner steps per wall second after `--warmup` steps
                    (from metrics.jsonl: the window runs from the warm-up row to the last row)
  learner busy/idle sum of `time/step_s` and of `time/wait_data_s` over the window / window
  learner s/step    mean `time/step_s` over the window: what one step costs the learner,
                    whatever its token count (trained tokens per step change with response
                    lengths, i.e. with how fast a method learns, so tok/s alone can mislead)
  rollout busy      Δ rlrt_rollout_engine_busy_seconds_total over the window / window, mean over
                    workers (scraped from each worker's /metrics every tick)
  teacher busy      Δ rlrt_teacher_score_seconds_sum over the window / window
  bound             the overlap bound: tokens per step / busy seconds per step of the slowest
                    stage (learner step_s; rollout busy / workers; teacher busy), and the
                    fraction of it reached. On a box with fewer cores than busy processes the
                    stages also slow each other down, which no bound of this kind sees.
  peak RSS          per service, the highest VmHWM of its processes (sampled from
                    /proc/<pid>/status of every descendant; a service's helpers count to it)
  vs first          median tok/s over the first configuration's; "steps vs first" the same
                    for steps/min
  foreign load      CPU seconds per wall second used on this box by processes that are not
                    this bench or its descendants (/proc/stat minus /proc/<pid>/stat), and
                    /proc/loadavg. When any run of a comparison saw more foreign load than
                    `--max-foreign-cores`, the ratio to the first configuration is refused
                    (the row says so) instead of printing a number measured against noise.

`--json PATH` also writes every run's raw figures. The table is Markdown, as recorded in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rlrt_core.config import load_config  # noqa: E402
from services.launcher import LocalRun, read_metrics, service_endpoints  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Setup:
    """One configuration of a suite: recipe overrides and the number of rollout workers."""

    name: str
    overrides: dict[str, Any]
    rollout_workers: int = 1


SUITES: dict[str, list[Setup]] = {
    "async": [Setup("staleness 0 (sync)", {"learner": {"max_staleness": 0}}),
              Setup("staleness 1", {"learner": {"max_staleness": 1}}),
              Setup("staleness 2", {"learner": {"max_staleness": 2}})],
    "methods": [Setup("rlrt, staleness 1", {"learner": {"max_staleness": 1}, "algorithm": {"method": "rlrt"}}),
                Setup("grpo, staleness 1", {"learner": {"max_staleness": 1}, "algorithm": {"method": "grpo"}})],
    "workers": [Setup("1 rollout worker", {"learner": {"max_staleness": 1}}, 1),
                Setup("2 rollout workers", {"learner": {"max_staleness": 1}}, 2)],
    # the bottleneck stage (the learner on the demo) with one or two intra-op threads
    "threads": [Setup("learner 1 thread", {"learner": {"max_staleness": 1}, "launcher": {"threads": {"learner": 1}}}),
                Setup("learner 2 threads", {"learner": {"max_staleness": 1}, "launcher": {"threads": {"learner": 2}}})],
}


# -- /proc sampling -------------------------------------------------------------------------

def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, utime+stime in ticks, cmdline) of every process we can read."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{p}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out[int(p)] = (int(rest[1]), int(rest[11]) + int(rest[12]), cmd)
    return out


def _descendants(table: dict[int, tuple[int, int, str]], root: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    seen, todo = set(), [root]
    while todo:
        x = todo.pop()
        if x not in seen:
            seen.add(x)
            todo.extend(kids.get(x, []))
    return seen


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _box_busy_ticks() -> int:
    """CPU ticks spent busy on the whole box (all cores), from /proc/stat."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def _service_of(cmd: str) -> str | None:
    """The worker a process belongs to, from a `serve <service> ... --worker <name>` command line."""
    parts = cmd.split()
    if "serve" in parts and "--worker" in parts:
        i = parts.index("--worker")
        if i + 1 < len(parts):
            return parts[i + 1]
    if "redis-server" in cmd:
        return "redis"
    return None


class BoxLoad:
    """Who used the box's CPUs since it was made: this process and its descendants (own) against
    everything else (foreign), and the load average seen at each `tick()`."""

    def __init__(self) -> None:
        self.me = os.getpid()
        self.t0 = time.time()
        self.box0 = _box_busy_ticks()
        self.own_cpu: dict[int, int] = {}      # pid -> last seen cpu ticks (kept after it exits)
        self.own_cpu0: dict[int, int] = {}     # pid -> cpu ticks when first seen
        table = _proc_table()
        self.own_cpu0[self.me] = table[self.me][1] if self.me in table else 0
        self.load: list[float] = []

    def tick(self) -> tuple[dict[int, tuple[int, int, str]], set[int]]:
        """Sample; -> (the process table, this process's descendants) for callers that look further."""
        table = _proc_table()
        mine = _descendants(table, self.me)
        for pid in mine:
            self.own_cpu0.setdefault(pid, 0)  # born during the run: all its CPU time is the run's
            self.own_cpu[pid] = table[pid][1]
        with open("/proc/loadavg") as fh:
            self.load.append(float(fh.read().split()[0]))
        return table, mine

    def foreign_cores(self) -> float:
        """Mean number of cores used by processes outside this bench since it started (a child that
        lived between two ticks counts as foreign: tick often)."""
        wall = max(time.time() - self.t0, 1e-9)
        box = _box_busy_ticks() - self.box0
        own = sum(self.own_cpu[p] - self.own_cpu0[p] for p in self.own_cpu)
        return max(box - own, 0) / CLK_TCK / wall


class Sampler(BoxLoad):
    """Called every tick of `LocalRun.wait`: own vs foreign CPU (BoxLoad), peak RSS per service,
    stage busy counters from the services' /metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_kib: dict[str, int] = {}     # service -> highest VmHWM seen (summed over its processes)
        self.busy: dict[str, list[tuple[float, float]]] = {}  # series "rollout-0"/"teacher-0" -> (t, seconds)

    def tick(self, run: LocalRun) -> None:  # type: ignore[override]
        table, mine = super().tick()
        per_service: dict[str, int] = {}
        owner: dict[int, str] = {}
        for pid in sorted(mine):
            name = _service_of(table[pid][2])
            if name is None:  # a helper process (e.g. the verifier's pool) counts to its parent's service
                name = owner.get(table[pid][0])
            if name is None:
                continue
            owner[pid] = name
            hwm = _vm_hwm_kib(pid)
            if hwm is not None:
                per_service[name] = per_service.get(name, 0) + hwm
        for name, kib in per_service.items():
            self.peak_kib[name] = max(self.peak_kib.get(name, 0), kib)
        now = time.time()
        for ep in service_endpoints(run.run_dir):
            worker = ep.get("worker", "")
            if not (worker.startswith("rollout") or worker.startswith("teacher")) or not ep.get("admin_port"):
                continue
            try:
                text = httpx.get(f"http://127.0.0.1:{ep['admin_port']}/metrics", timeout=1.0).text
            except httpx.HTTPError:
                continue
            want = "rlrt_rollout_engine_busy_seconds" if worker.startswith("rollout") else "rlrt_teacher_score_seconds"
            for fam in text_string_to_metric_families(text):
                if fam.name != want:
                    continue
                for s in fam.samples:
                    if s.name in ("rlrt_rollout_engine_busy_seconds_total", "rlrt_teacher_score_seconds_sum"):
                        self.busy.setdefault(worker, []).append((now, float(s.value)))

    def busy_between(self, worker: str, t0: float, t1: float) -> float | None:
        """Busy seconds a worker's counter gained between t0 and t1 (nearest samples)."""
        series = self.busy.get(worker, [])
        if len(series) < 2:
            return None
        before = [v for t, v in series if t <= t0] or [series[0][1]]
        after = [v for t, v in series if t >= t1] or [series[-1][1]]
        return max(after[0] - before[-1], 0.0)


# -- one run --------------------------------------------------------------------------------

@dataclass
class RunResult:
    setup: str
    repeat: int
    steps: int
    window_s: float
    tokens_per_s: float
    steps_per_min: float
    learner_busy: float
    learner_idle: float
    rollout_busy: float | None
    teacher_busy: float | None
    bound_tokens_per_s: float | None
    slowest_stage: str | None
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    foreign_cores: float = 0.0
    loadavg_max: float = 0.0
    run_dir: str = ""
    learner_step_s: float | None = None  # mean time/step_s over the window


def run_once(recipe: Path, setup: Setup, steps: int, warmup: int, run_dir: Path, repeat: int,
             timeout_s: float) -> RunResult:
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    overrides: dict[str, Any] = json.loads(json.dumps(setup.overrides))
    overrides.setdefault("learner", {}).update(total_steps=steps, checkpoint_every=0)
    overrides.setdefault("metrics", {})["run_dir"] = str(run_dir)
    overrides.setdefault("transport", {})["redis_url"] = None  # a private embedded Redis per run
    overrides["run_name"] = f"bench-{run_dir.name}"
    cfg = load_config(recipe, overrides=overrides, use_env=False)
    sampler = Sampler()
    run = LocalRun(cfg, n_rollout=setup.rollout_workers)
    try:
        run.start()
        rc = run.wait(on_tick=sampler.tick, tick_s=0.25, timeout_s=timeout_s)
    finally:
        run.stop()
    if rc != 0:
        raise RuntimeError(f"{setup.name}: the run failed (exit {rc}); logs in {run_dir / 'logs'}")
    rows = read_metrics(run_dir)
    if len(rows) <= warmup:
        raise RuntimeError(f"{setup.name}: only {len(rows)} steps recorded, need more than --warmup {warmup}")
    first, window_rows = rows[warmup - 1] if warmup else None, rows[warmup:]
    t_start = first["time"] if first else window_rows[0]["time"] - window_rows[0]["time/step_s"] - \
        window_rows[0]["time/wait_data_s"]
    t_end = rows[-1]["time"]
    window = max(t_end - t_start, 1e-9)
    tokens = sum(r["tokens/trained"] for r in window_rows)
    n = len(window_rows)
    step_s = sum(r["time/step_s"] for r in window_rows)
    wait_s = sum(r["time/wait_data_s"] for r in window_rows)
    rollout = [sampler.busy_between(f"rollout-{i}", t_start, t_end) for i in range(setup.rollout_workers)]
    rollout_busy = (sum(rollout) / len(rollout) / window) if all(b is not None for b in rollout) else None
    teacher = sampler.busy_between("teacher-0", t_start, t_end)
    stages = {"learner": step_s / n}
    if rollout_busy is not None:
        stages["rollout"] = rollout_busy * window / n
    if teacher is not None:
        stages["teacher"] = teacher / n
    slowest = max(stages, key=stages.get)
    bound = (tokens / n) / stages[slowest] if stages[slowest] > 0 else None
    return RunResult(setup=setup.name, repeat=repeat, steps=n, window_s=window, tokens_per_s=tokens / window,
                     steps_per_min=60.0 * n / window, learner_busy=step_s / window, learner_idle=wait_s / window,
                     rollout_busy=rollout_busy, teacher_busy=None if teacher is None else teacher / window,
                     bound_tokens_per_s=bound, slowest_stage=slowest,
                     peak_rss_mib={k: v / 1024 for k, v in sorted(sampler.peak_kib.items())},
                     foreign_cores=sampler.foreign_cores(), loadavg_max=max(sampler.load, default=0.0),
                     run_dir=str(run_dir), learner_step_s=step_s / n)


# -- the table ------------------------------------------------------------------------------

def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _spread(xs: list[float], fmt: str) -> str:
    return f"{_med(xs):{fmt}} [{min(xs):{fmt}}-{max(xs):{fmt}}]" if len(xs) > 1 else f"{xs[0]:{fmt}}"


def _opt(xs: list[float | None], fmt: str) -> str:
    vals = [x for x in xs if x is not None]
    return f"{_med(vals):{fmt}}" if vals else "n/a"


def service_kind(worker: str) -> str:
    return worker.rsplit("-", 1)[0] if worker != "redis" else "redis"


def table(setups: list[Setup], results: list[RunResult], max_foreign: float) -> str:
    """The Markdown table of a suite (one row per configuration) and a note per refusal."""
    head = ("| config | runs | tok/s | steps/min | learner s/step | learner busy | learner idle | rollout busy "
            "| teacher busy | bound tok/s (slowest) | of bound | peak RSS MiB | foreign cores | vs first | steps vs first |")
    lines = [head, "|" + "---|" * 15]
    by = {s.name: [r for r in results if r.setup == s.name] for s in setups}
    base = by[setups[0].name]
    base_busy = any(r.foreign_cores > max_foreign for r in base)
    notes = []
    for s in setups:
        rs = by[s.name]
        if not rs:
            continue
        tps = [r.tokens_per_s for r in rs]
        bounds = [r.bound_tokens_per_s for r in rs if r.bound_tokens_per_s]
        of_bound = [r.tokens_per_s / r.bound_tokens_per_s for r in rs if r.bound_tokens_per_s]
        kinds: dict[str, float] = {}
        for r in rs:
            per: dict[str, float] = {}
            for w, mib in r.peak_rss_mib.items():
                per[service_kind(w)] = per.get(service_kind(w), 0.0) + mib
            for k, v in per.items():
                kinds[k] = max(kinds.get(k, 0.0), v)
        total = max(sum(r.peak_rss_mib.values()) for r in rs)
        rss = " ".join(f"{k} {v:.0f}" for k, v in sorted(kinds.items())) + f" total {total:.0f}"
        foreign = max(r.foreign_cores for r in rs)
        spm = [r.steps_per_min for r in rs]
        if s is setups[0]:
            ratio = steps_ratio = "1.00x" if not base_busy else "refused: box busy"
        elif not base:
            ratio = steps_ratio = "n/a: no run of the first configuration"
        elif base_busy or foreign > max_foreign:
            ratio = steps_ratio = "refused: box busy"
        else:
            ratio = f"{_med(tps) / _med([r.tokens_per_s for r in base]):.2f}x"
            steps_ratio = f"{_med(spm) / _med([r.steps_per_min for r in base]):.2f}x"
        if ratio.startswith("refused"):
            notes.append(f"{s.name}: foreign load up to {foreign:.2f} cores (limit {max_foreign:.2f}; first "
                         f"configuration {max((r.foreign_cores for r in base), default=0.0):.2f}), load average up to "
                         f"{max(r.loadavg_max for r in rs):.1f}: no ratio printed, the box was busy with something else")
        slow = max({r.slowest_stage for r in rs if r.slowest_stage}, key=lambda k: sum(r.slowest_stage == k for r in rs),
                   default="n/a")
        lines.append(
            f"| {s.name} | {len(rs)} | {_spread(tps, '.1f')} | {_spread(spm, '.2f')} "
            f"| {_opt([r.learner_step_s for r in rs], '.1f')} | {_opt([r.learner_busy for r in rs], '.2f')} | {_opt([r.learner_idle for r in rs], '.2f')} "
            f"| {_opt([r.rollout_busy for r in rs], '.2f')} | {_opt([r.teacher_busy for r in rs], '.2f')} "
            f"| {(_opt(bounds, '.1f') + f' ({slow})') if bounds else 'n/a'} "
            f"| {_opt(of_bound, '.2f')} | {rss} | {foreign:.2f} | {ratio} | {steps_ratio} |")
    return "\n".join(lines + ([""] + [f"note: {n}" for n in notes] if notes else []))


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of the printed Markdown tables as {column: cell} (for tests and scripts)."""
    out, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None if not line.strip() else header
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(line) <= set("|-: "):
            out.append(dict(zip(header, cells)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    ap.add_argument("--steps", type=int, default=8, help="learner steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of the rates (model loading, first batch)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=ROOT / "runs" / "bench-pipeline")
    ap.add_argument("--max-foreign-cores", type=float, default=0.2,
                    help="refuse ratios when processes outside the bench used more cores than this")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    with open("/proc/cpuinfo") as fh:
        model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} cores ({model}); recipe {args.recipe}; {args.steps} steps per run, "
          f"warm-up {args.warmup}; {args.repeats} repeat(s), interleaved", flush=True)
    all_results: dict[str, list[RunResult]] = {}
    any_failed = False
    for suite in suites:
        setups = SUITES[suite]
        results: list[RunResult] = []
        failures: list[str] = []
        for rep in range(args.repeats):
            for i, s in enumerate(setups):
                d = args.dir / suite / f"{i}-r{rep}"
                try:
                    r = run_once(args.recipe, s, args.steps, args.warmup, d, rep, args.timeout)
                except (RuntimeError, TimeoutError) as err:  # e.g. a service killed by the OOM killer
                    failures.append(f"{s.name} #{rep + 1}: {err}")
                    print(f"  [{suite}] {s.name} #{rep + 1}: FAILED: {err}", flush=True)
                    continue
                results.append(r)
                print(f"  [{suite}] {s.name} #{rep + 1}: {r.tokens_per_s:.1f} tok/s, {r.steps_per_min:.2f} steps/min, "
                      f"learner busy {r.learner_busy:.2f}, foreign {r.foreign_cores:.2f} cores, "
                      f"load<= {r.loadavg_max:.1f}", flush=True)
        all_results[suite] = results
        any_failed = any_failed or bool(failures)
        print(f"\n== suite {suite}\n{table(setups, results, args.max_foreign_cores)}\n"
              + "".join(f"failed run: {f}\n" for f in failures), flush=True)
    if args.json:
        args.json.write_text(json.dumps({k: [asdict(r) for r in v] for k, v in all_results.items()}, indent=1))
    return 1 if any_failed else 0


if __name__ == "__main__":
    sys.exit(main())
