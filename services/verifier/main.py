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

log = logging.getLogger("rlrt.verifier")
IN, OUT, GROUP = "rollouts", "verified", "verifier"


def _outcome(r) -> str:
    if r.timed_out:
        return "timeout"
    if r.reward > 0.5:
        return "correct"
    return "unparseable" if r.extracted is None else "wrong"


def run(cfg: RunConfig, worker: str) -> int:
    rt = ServiceRuntime("verifier", cfg, worker)
    rt.install_signal_handlers()
    m = rt.metrics
    counters = {"groups": 0, "completions": 0, "correct": 0, "wrong": 0, "unparseable": 0, "timeout": 0, "dead": 0}
    rt.start_admin(lambda: {"processed": counters["groups"], "counters": dict(counters), "mode": cfg.verifier.mode})
    verifier = Verifier(mode=cfg.verifier.mode, timeout_s=cfg.verifier.timeout_s, workers=cfg.verifier.workers)
    rt.bus.ensure_group(IN, GROUP)
    rt.set_ready(True)

    def step() -> bool:
        pairs = rt.bus.consume_messages(IN, GROUP, worker, pb.RolloutGroup, count=8,
                                        block_ms=cfg.transport.block_ms)
        if not pairs:
            return False
        done, outputs = [], []
        for e, g in pairs:
            if not g.completions:
                rt.bus.dead_letter(e, "verifier: RolloutGroup has no completions")
                m.dead_lettered.labels(reason="bad_rollout_group").inc()
                counters["dead"] += 1
                continue
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
            done.append(e)
            outputs.append(g.SerializeToString())
            counters["groups"] += 1
            counters["completions"] += len(results)
        if done:
            rt.bus.ack_many(done, outputs=[[(OUT, p)] for p in outputs])
        return True

    try:
        # A failed batch leaves its entries pending for us: re-read them next round.
        rt.loop(step, on_error=rt.retry_pending(IN, GROUP))
    finally:
        verifier.close()
        rt.close()
    return 0
