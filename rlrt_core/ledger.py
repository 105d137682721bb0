"""The learner's ledger of prompt groups: what it dispatched and what became of each.

Every dispatched group ends exactly one way, and the ledger counts it there:

    dispatched = trained + dropped_stale + dead + outstanding

`outstanding` are the groups still somewhere in the pipeline (a stream entry, a worker's
hands, the learner's buffer). The ledger lives in the learner's memory and in its
checkpoints, independently of Redis, which is what makes recovery possible: after a Redis
restart that lost data, or a learner resumed from a checkpoint older than its last acks,
every outstanding group that Redis no longer holds is re-dispatched under the same id (see
`missing`), so it is still trained exactly once. Groups that arrive but were never dispatched
by this ledger (dispatched after the checkpoint by a learner that then died) are adopted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class GroupRecord:
    problem: int        # index into the learner's problem list
    version: int        # learner version at (re)dispatch (the task's min_version)
    at: float           # unix time of the last (re)dispatch
    redispatches: int = 0


@dataclass
class GroupLedger:
    outstanding: dict[str, GroupRecord] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {
        "dispatched": 0, "trained": 0, "dropped_stale": 0, "dead": 0, "adopted": 0, "redispatched": 0})

    def dispatched(self, gid: str, problem: int, version: int) -> None:
        self.outstanding[gid] = GroupRecord(problem, version, time.time())
        self.counts["dispatched"] += 1

    def redispatched(self, gid: str, version: int) -> None:
        """`gid` was lost and sent again (same id): still one dispatch, one outstanding group."""
        rec = self.outstanding[gid]
        rec.version, rec.at = version, time.time()
        rec.redispatches += 1
        self.counts["redispatched"] += 1

    def adopt(self, gid: str, problem: int, version: int) -> None:
        """A group of this run that this ledger never dispatched (a learner that died after its
        last checkpoint did): count it as dispatched now, so the identity still holds."""
        if gid not in self.outstanding:
            self.dispatched(gid, problem, version)
            self.counts["adopted"] += 1

    def _finish(self, gid: str, how: str) -> bool:
        if self.outstanding.pop(gid, None) is None:
            return False
        self.counts[how] += 1
        return True

    def trained(self, gid: str) -> bool:
        return self._finish(gid, "trained")

    def dropped(self, gid: str) -> bool:
        return self._finish(gid, "dropped_stale")

    def dead(self, gid: str) -> bool:
        return self._finish(gid, "dead")

    def knows(self, gid: str) -> bool:
        return gid in self.outstanding

    def missing(self, present: Iterable[str]) -> list[str]:
        """Outstanding ids that are not in `present` (what Redis and the learner's buffer
        hold): lost, to be re-dispatched. Oldest first."""
        have = set(present)
        return sorted((g for g in self.outstanding if g not in have), key=lambda g: self.outstanding[g].at)

    def identity_holds(self) -> bool:
        c = self.counts
        return c["dispatched"] == c["trained"] + c["dropped_stale"] + c["dead"] + len(self.outstanding)

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts),
                "outstanding": {g: [r.problem, r.version, r.at, r.redispatches] for g, r in self.outstanding.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.counts.update({k: int(v) for k, v in state.get("counts", {}).items()})
        self.outstanding = {g: GroupRecord(int(p), int(v), float(a), int(n))
                            for g, (p, v, a, n) in state.get("outstanding", {}).items()}
