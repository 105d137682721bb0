"""Verifier: `rollouts` -> reward per completion -> `verified`.

Each check runs in a process pool under a hard time limit (`rlrt_core.reward.Verifier`),
so a pathological answer costs one timeout (reward 0, counted), never a stuck service.
"""

from __future__ import annotations

import logging
import time

from rlrt_core.config import RunConfig
from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.reward import Verifier
from services.common.runtime import ServiceRuntime
from services.common.stage import relay_groups

log = logging.getLogger("rlrt.verifier")
IN, OUT, GROUP = "rollouts", "verified", "verifier"


def _outcome(r) -> str:
    """The verifier's own outcome; a checker error counts as unparseable (reward 0)."""
    return r.outcome if r.outcome in ("correct", "wrong", "unparseable", "timeout") else "unparseable"


def run(cfg: RunConfig, worker: str) -> int:
    rt = ServiceRuntime("verifier", cfg, worker)
    rt.install_signal_handlers()
    m = rt.metrics
    counters = {"groups": 0, "completions": 0, "correct": 0, "wrong": 0, "unparseable": 0, "timeout": 0, "dead": 0}
    rt.start_admin(lambda: {"processed": counters["groups"], "counters": dict(counters), "mode": cfg.verifier.mode})
    verifier = Verifier(mode=cfg.verifier.mode, timeout_s=cfg.verifier.timeout_s, workers=cfg.verifier.workers)
    rt.bus.ensure_group(IN, GROUP)
    rt.set_ready(True)

    def check(g: pb.RolloutGroup) -> str | None:
        return None if g.completions else "RolloutGroup has no completions"

    def handle(g: pb.RolloutGroup) -> None:
        t0 = time.perf_counter()
        results = verifier.verify_group([c.text for c in g.completions], g.problem.answer)
        dt = time.perf_counter() - t0
        del g.verifier_results[:]
        for r in results:
            vr = g.verifier_results.add(reward=float(r.reward), timed_out=bool(r.timed_out))
            if r.extracted is not None:
                vr.extracted = r.extracted
            if r.reason is not None:
                vr.reason = r.reason
            out = _outcome(r)
            counters[out] += 1
            m.rewards.labels(outcome=out).inc()
            if r.timed_out:
                m.timeouts.inc()
        m.completion_seconds.observe(dt / max(len(results), 1))
        m.verified_groups.inc()
        g.timestamps.verified_at = time.time()
        counters["completions"] += len(results)

    def step() -> bool:
        return relay_groups(rt, IN, OUT, GROUP, count=8, check=check, handle=handle, counters=counters)

    try:
        # A failed batch leaves its entries pending for us: re-read them next round.
        rt.loop(step, on_error=rt.retry_pending(IN, GROUP))
    finally:
        verifier.close()
        rt.close()
    return 0
