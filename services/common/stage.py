"""The shape shared by the middle stages (verifier, teacher): take RolloutGroups from one
stream, enrich each in place, publish it on the next stream while acking the input."""

from __future__ import annotations

import logging
from typing import Callable

from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.transport.codec import Limits

log = logging.getLogger(__name__)


def relay_groups(rt, *, count: int, handle: Callable[[pb.RolloutGroup], None], counters: dict[str, int],
                 limits: Limits | None = None) -> bool:
    """One round of the service's stage (`rt.stage`): consume up to `count` groups (each
    validated alone at the boundary, see `codec.validate`), enrich each with `handle(g)`,
    and write every entry's output + ack atomically. A group whose handling fails for a
    reason of its own is dead-lettered alone with that reason; infrastructure failures
    (Redis, the weight server) propagate so the whole round is retried. Returns whether
    work was done."""
    from services.common.runtime import is_transient

    st = rt.stage
    pairs = rt.bus.consume_messages(st.input, st.group, rt.worker, st.message, count=count,
                                    block_ms=rt.cfg.transport.block_ms, limits=limits)
    if not pairs:
        return False
    done, outputs = [], []
    for entry, g in pairs:
        try:
            handle(g)
        except Exception as err:
            if is_transient(err):
                raise
            log.warning("dead-lettering %s: %s", g.group_id, err, exc_info=True)
            rt.bus.dead_letter(entry, f"{rt.service}: cannot process group {g.group_id!r}: "
                                      f"{type(err).__name__}: {err}", kind="processing_failed")
            counters["dead_lettered"] += 1
            continue
        done.append(entry)
        outputs.append(g)
        counters["groups"] += 1
    if done:
        rt.bus.ack_many(done, outputs=[[(st.output, g)] for g in outputs])
        rt.progressed()
    return True
