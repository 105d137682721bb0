"""An in-memory `StreamBus` for fast unit tests of the loops (no Redis): the same methods,
the same delivery contract (consumer groups, pending entries owned by a consumer, atomic
outputs + ack, dedupe ids, dead letters with reasons, validation through the codec), held in
dicts behind one lock. It serves tests beside the Redis-backed ones, never instead of them.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from google.protobuf.message import Message

from rlrt_core.stages import DEAD_STREAM, PIPELINE_STREAMS, STAGE_GROUPS, STREAM_NAMES
from rlrt_core.transport.codec import Limits, MalformedMessage, decode
from rlrt_core.transport.streams import AckStatus, BackpressureError, DeadLetter, Entry, StreamBus


class MemoryKV:
    """The few plain key/value calls the learner makes on `bus.client` (its epoch marker)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value if isinstance(value, bytes) else str(value).encode()

    def flushall(self) -> None:
        """What a Redis restart without persistence does."""
        self.data.clear()


@dataclass
class _Pending:
    consumer: str
    deliveries: int
    since: float


@dataclass
class _Group:
    delivered: int = 0                      # index of the next undelivered entry
    pending: dict[str, _Pending] = field(default_factory=dict)


class MemoryBus:
    """See module docstring. `fail_next` (a count) makes the next calls raise
    ConnectionError, to exercise retry paths without a server."""

    def __init__(self, run: str, *, maxlen: int = 10_000, claim_idle_ms: int = 60_000, max_deliveries: int = 5,
                 prefix: str = "rlrt") -> None:
        self.run, self.prefix, self.maxlen = run, prefix, maxlen
        self.claim_idle_ms, self.max_deliveries = claim_idle_ms, max_deliveries
        self.client = MemoryKV()
        self.on_claim: Callable[[str, int], None] | None = None
        self.on_dead_letter: Callable[[str, str], None] | None = None
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self.fail_next = 0
        self.lose_everything()

    # -- test controls -------------------------------------------------------------------
    def lose_everything(self) -> None:
        """Drop every stream, group, done-set and key (a Redis restart without persistence)."""
        with self._lock:
            self.streams: dict[str, list[tuple[str, dict[str, Any]]]] = {n: [] for n in STREAM_NAMES}
            self.groups: dict[str, _Group] = {}
            self.done: dict[str, set[str]] = {}
            self.client.flushall()

    def _maybe_fail(self) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ConnectionError("injected: bus unavailable")

    # -- names ---------------------------------------------------------------------------
    def key(self, name: str) -> str:
        if name not in STREAM_NAMES:
            raise ValueError(f"unknown stream {name!r}; expected one of {STREAM_NAMES}")
        return f"{self.prefix}:{self.run}:{name}"

    def done_key(self, group: str) -> str:
        return f"{self.prefix}:{self.run}:done:{group}"

    # -- groups and producing --------------------------------------------------------------
    def ensure_group(self, name: str, group: str) -> None:
        with self._lock:
            self.groups.setdefault(name, _Group())

    def ensure_groups(self) -> None:
        for name, group in STAGE_GROUPS.items():
            self.ensure_group(name, group)

    def _unfinished(self, name: str) -> int:
        g = self.groups.get(name)
        if g is None:
            return len(self.streams[name])
        return len(g.pending) + len(self.streams[name]) - g.delivered

    def room(self, name: str) -> int:
        with self._lock:
            self._maybe_fail()
            return max(0, self.maxlen - self._unfinished(name))

    def _add(self, name: str, message: Message | bytes, extra: dict[str, Any] | None = None) -> str:
        fields = StreamBus._fields(message) if not isinstance(message, dict) else dict(message)
        if extra:
            fields.update(extra)
        entry_id = f"{next(self._ids)}-0"
        self.streams[name].append((entry_id, fields))
        return entry_id

    def publish(self, name: str, message: Message | bytes) -> str:
        return self.publish_many(name, [message])[0]

    def publish_many(self, name: str, messages: Sequence[Message | bytes], *,
                     pre: Callable[[Any], None] | None = None) -> list[str]:
        if name == DEAD_STREAM:
            raise ValueError("use dead_letter() to write to the dead stream")
        with self._lock:
            self._maybe_fail()
            if len(messages) > self.maxlen - self._unfinished(name):
                raise BackpressureError(f"stream {self.key(name)} is full (maxlen={self.maxlen})")
            if pre is not None:
                pre(_Pipe(self))
            return [self._add(name, m) for m in messages]

    # -- consuming -----------------------------------------------------------------------
    def _entry(self, name: str, consumer: str, entry_id: str, fields: dict, deliveries: int) -> Entry:
        return Entry(stream=name, id=entry_id, group=STAGE_GROUPS.get(name, ""), consumer=consumer,
                     type=str(fields.get("type", "")), payload=fields.get("data"), deliveries=deliveries,
                     fields=fields)

    def consume(self, name: str, group: str, consumer: str, *, count: int = 16,
                block_ms: int | None = None) -> list[Entry]:
        with self._lock:
            self._maybe_fail()
            g = self.groups.setdefault(name, _Group())
            by_id = dict(self.streams[name])
            out: list[Entry] = []
            now = time.time()
            for entry_id, p in list(g.pending.items()):  # reclaim idle entries of other consumers
                if len(out) >= count:
                    break
                if p.consumer != consumer and (now - p.since) * 1000 >= self.claim_idle_ms:
                    p.consumer, p.deliveries, p.since = consumer, p.deliveries + 1, now
                    out.append(self._entry(name, consumer, entry_id, by_id[entry_id], p.deliveries))
                    if self.on_claim is not None:
                        self.on_claim(name, 1)
            while len(out) < count and g.delivered < len(self.streams[name]):
                entry_id, fields = self.streams[name][g.delivered]
                g.delivered += 1
                g.pending[entry_id] = _Pending(consumer, 1, now)
                out.append(self._entry(name, consumer, entry_id, fields, 1))
        screened = []
        for e in out:
            if e.deliveries > self.max_deliveries:
                self.dead_letter(e, f"delivered {e.deliveries} times (max_deliveries={self.max_deliveries}): "
                                    "its consumers kept dying or timing out", kind="max_deliveries")
            else:
                screened.append(e)
        return screened

    def consume_messages(self, name: str, group: str, consumer: str, cls: type, *, count: int = 16,
                         block_ms: int | None = None, limits: Limits | None = None) -> list[tuple[Entry, Any]]:
        out = []
        for entry in self.consume(name, group, consumer, count=count, block_ms=block_ms):
            try:
                if entry.type and entry.type != cls.DESCRIPTOR.full_name:
                    raise MalformedMessage(f"entry holds {entry.type}, expected {cls.DESCRIPTOR.full_name}")
                msg = decode(entry.payload, cls, limits=limits)
                if getattr(msg, "run_id", self.run) != self.run:
                    raise MalformedMessage(f"message of run {msg.run_id!r} on a stream of run {self.run!r}")
            except MalformedMessage as err:
                self.dead_letter(entry, str(err), kind="malformed")
                continue
            out.append((entry, msg))
        return out

    def redeliver_pending(self, name: str, group: str, consumer: str, *, count_delivery: bool = True) -> None:
        """Make `consumer`'s pending entries deliverable again (to anyone, at once)."""
        with self._lock:
            g = self.groups.get(name)
            for p in (g.pending.values() if g else ()):
                if p.consumer == consumer:
                    p.since = 0.0

    def touch(self, entries: Sequence[Entry]) -> int:
        n = 0
        with self._lock:
            for e in entries:
                p = self.groups.get(e.stream, _Group()).pending.get(e.id)
                if p is not None and p.consumer == e.consumer:
                    p.since = time.time()
                    n += 1
        return n

    # -- acknowledging ---------------------------------------------------------------------
    def ack(self, entry: Entry, outputs: Sequence[tuple[str, Any]] = (), *, dedupe_id: str | None = None) -> AckStatus:
        return self.ack_many([entry], outputs=[outputs], dedupe_ids=None if dedupe_id is None else [dedupe_id])[0]

    def ack_many(self, entries: Sequence[Entry], *, outputs: Sequence[Sequence[tuple[str, Any]]] | None = None,
                 dedupe_ids: Sequence[str | None] | None = None) -> list[AckStatus]:
        with self._lock:
            self._maybe_fail()
            out = []
            for i, e in enumerate(entries):
                g = self.groups.get(e.stream)
                p = g.pending.get(e.id) if g else None
                if p is None or p.consumer != e.consumer:
                    out.append(AckStatus.NOT_OWNER)
                    continue
                dedupe = None if dedupe_ids is None else dedupe_ids[i]
                if dedupe:
                    done = self.done.setdefault(e.group, set())
                    if dedupe in done:
                        del g.pending[e.id]
                        out.append(AckStatus.DUPLICATE)
                        continue
                    done.add(dedupe)
                for name, message in (outputs[i] if outputs is not None else ()):
                    self._add(name, message)
                del g.pending[e.id]
                out.append(AckStatus.OK)
            return out

    def dead_letter(self, entry: Entry, reason: str, *, kind: str = "invalid") -> AckStatus:
        with self._lock:
            g = self.groups.get(entry.stream)
            p = g.pending.get(entry.id) if g else None
            if p is None or p.consumer != entry.consumer:
                return AckStatus.NOT_OWNER
            del g.pending[entry.id]
            fields = {"source": entry.stream, "source_id": entry.id, "group": entry.group, "consumer": entry.consumer,
                      "reason": reason, "deliveries": entry.deliveries, "type": entry.type, "kind": kind,
                      "data": entry.payload, "gid": entry.fields.get("gid", "")}
            self._add(DEAD_STREAM, fields)
        if self.on_dead_letter is not None:
            self.on_dead_letter(entry.stream, kind)
        return AckStatus.OK

    def seen(self, ids: Sequence[str], group: str = "learner") -> list[bool]:
        with self._lock:
            done = self.done.get(group, set())
            return [i in done for i in ids]

    # -- reading state -----------------------------------------------------------------------
    def _dead(self, entry_id: str, f: dict[str, Any]) -> DeadLetter:
        return DeadLetter(id=entry_id, source=f["source"], source_id=f["source_id"], group=f["group"],
                          reason=f["reason"], deliveries=int(f["deliveries"]), type=f["type"], payload=f["data"],
                          gid=f["gid"] if isinstance(f["gid"], str) else f["gid"].decode(), kind=f["kind"])

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        with self._lock:
            return [self._dead(i, f) for i, f in reversed(self.streams[DEAD_STREAM][-count:])]

    def dead_letters_after(self, after_id: str = "0-0", count: int = 1000) -> list[DeadLetter]:
        after = int(after_id.split("-")[0])
        with self._lock:
            rows = [(i, f) for i, f in self.streams[DEAD_STREAM] if int(i.split("-")[0]) > after]
            return [self._dead(i, f) for i, f in rows[:count]]

    def in_flight_ids(self) -> set[str]:
        with self._lock:
            out: set[str] = set()
            for name in PIPELINE_STREAMS:
                g = self.groups.get(name, _Group())
                by_id = dict(self.streams[name])
                ids = list(g.pending) + [i for i, _ in self.streams[name][g.delivered:]]
                for i in ids:
                    gid = by_id[i].get("gid", "")
                    out.add(gid.decode() if isinstance(gid, bytes) else gid)
            out.discard("")
            return out

    def backlog(self, names: Sequence[str] = PIPELINE_STREAMS) -> int:
        with self._lock:
            self._maybe_fail()
            return sum(self._unfinished(n) for n in names)

    def stats(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            out = {}
            for name in STREAM_NAMES:
                g = self.groups.get(name)
                groups = {} if g is None or name == DEAD_STREAM else {
                    STAGE_GROUPS[name]: {"pending": len(g.pending), "lag": len(self.streams[name]) - g.delivered,
                                         "consumers": len({p.consumer for p in g.pending.values()}),
                                         "last_delivered_id": ""}}
                out[name] = {"key": self.key(name), "length": len(self.streams[name]), "groups": groups}
            return out

    def delete_run(self) -> int:
        with self._lock:
            n = sum(1 for s in self.streams.values() if s) + len(self.done) + len(self.client.data)
            self.lose_everything()
            return n


class _Pipe:
    """What `publish_many(pre=...)` hands to its callback: the done-set commands."""

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus

    def srem(self, key: str, *members: str) -> None:
        group = key.rsplit(":", 1)[-1]
        self.bus.done.setdefault(group, set()).difference_update(members)
