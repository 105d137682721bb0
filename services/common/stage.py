"""The shape shared by the middle stages (verifier, teacher): take RolloutGroups from one
stream, enrich each in place, publish it on the next stream while acking the input."""

from __future__ import annotations

from typing import Callable

from rlrt_core.proto import trajectory_pb2 as pb


def relay_groups(rt, src: str, dst: str, group: str, *, count: int,
                 check: Callable[[pb.RolloutGroup], str | None],
                 handle: Callable[[pb.RolloutGroup], None],
                 counters: dict[str, int]) -> bool:
    """One round: consume up to `count` groups; `check(g)` returns a reason to dead-letter
    the entry (bad input) or None; `handle(g)` enriches it. Outputs and acks of the round
    are written together (each entry's output + ack atomic). Returns whether work was done."""
    pairs = rt.bus.consume_messages(src, group, rt.worker, pb.RolloutGroup, count=count,
                                    block_ms=rt.cfg.transport.block_ms)
    if not pairs:
        return False
    done, outputs = [], []
    for entry, g in pairs:
        problem = check(g)
        if problem is not None:
            rt.bus.dead_letter(entry, f"{rt.service}: {problem}")
            rt.metrics.dead_lettered.labels(reason="bad_rollout_group").inc()
            counters["dead"] += 1
            continue
        handle(g)
        done.append(entry)
        outputs.append(g.SerializeToString())
        counters["groups"] += 1
    if done:
        rt.bus.ack_many(done, outputs=[[(dst, p)] for p in outputs])
    return True
