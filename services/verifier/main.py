"""Verifier: `rollouts` -> reward per completion -> `verified`.

Each check runs in a process pool under a hard time limit (`rlrt_core.reward.Verifier`),
so a pathological answer costs one timeout (reward 0, counted), never a stuck service.
"""

from __future__ import annotations

import logging
import time

from rlrt_core.config import RunConfig
from rlrt_core.reward import Verifier
from rlrt_core.transport.codec import Limits, set_verifier_results
from services.common.runtime import ServiceRuntime
from services.common.stage import relay_groups

log = logging.getLogger("rlrt.verifier")


def _outcome(r) -> str:
    """The verifier's own outcome; a checker error counts as unparseable (reward 0)."""
    return r.outcome if r.outcome in ("correct", "wrong", "unparseable", "timeout") else "unparseable"


def run(cfg: RunConfig, worker: str) -> int:
    rt = ServiceRuntime("verifier", cfg, worker)
    rt.install_signal_handlers()
    m = rt.metrics
    counters = {"groups": 0, "completions": 0, "correct": 0, "wrong": 0, "unparseable": 0, "timeout": 0, "dead_lettered": 0}
    rt.start_admin(lambda: {"processed": counters["groups"], "counters": dict(counters), "mode": cfg.verifier.mode})
    verifier = Verifier(mode=cfg.verifier.mode, timeout_s=cfg.verifier.timeout_s, workers=cfg.verifier.workers)
    rt.bus.ensure_group(rt.stage.input, rt.stage.group)
    rt.set_ready(True)
    limits = Limits(max_model_len=cfg.model.max_model_len)

    def handle(g) -> None:  # a RolloutGroup, enriched in place
        t0 = time.perf_counter()
        results = verifier.verify_group([c.text for c in g.completions], g.problem.answer)
        dt = time.perf_counter() - t0
        set_verifier_results(g, results)
        for r in results:
            out = _outcome(r)
            counters[out] += 1
            m.rewards.labels(outcome=out).inc()
            if r.timed_out:
                m.timeouts.inc()
        m.completion_seconds.observe(dt / max(len(results), 1))
        m.verified_groups.inc()
        counters["completions"] += len(results)

    def step() -> bool:
        return relay_groups(rt, count=8, handle=handle, counters=counters, limits=limits)

    try:
        # A failed batch leaves its entries pending for us: re-read them next round.
        rt.loop(step, on_error=rt.retry_pending())
    finally:
        verifier.close()
        rt.close()
    return 0
