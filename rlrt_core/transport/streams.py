"""Trajectory bus on Redis Streams.

Keys (one set per run): `{prefix}:{run}:{name}` for the streams `prompts`, `rollouts`,
`verified`, `scored` and `dead` (dead letters), `{prefix}:{run}:done:{group}` for the
set of group ids a consumer group has finished (dedupe).

Delivery contract (at-least-once in, exactly-once out):

* `consume` first reclaims entries another consumer has held longer than `claim_idle_ms`
  (a worker that died has its work redone by a peer), then reads new entries (blocking
  XREADGROUP). Reclaiming is XPENDING IDLE + XCLAIM rather than XAUTOCLAIM: XAUTOCLAIM
  cannot skip the caller's own entries, so a consumer that legitimately holds entries for
  long (the learner filling a batch) would re-claim them from itself, bumping their
  delivery counts until they were dead-lettered under it. XPENDING also gives the
  delivery counts in the same call. XCLAIM re-checks the idle time, so two peers never
  both win an entry. An entry delivered more than `max_deliveries` times goes to the
  `dead` stream with the reason instead of being handed out again. Consumers that work
  on an entry longer than `claim_idle_ms` call `touch` to keep it.
* `ack` runs one Lua script that checks the entry is still pending *for this consumer*,
  appends the stage's outputs (XADD) and acknowledges the input (XACK) atomically. If a
  slow consumer's entry was reclaimed by a peer, the slow consumer's ack finds it is no
  longer the owner and writes nothing (`AckStatus.NOT_OWNER`), so downstream sees every
  entry's output once. With `dedupe_id` the script also adds the id to the done-set and
  writes nothing for an id already there (`AckStatus.DUPLICATE`): the learner never
  trains on the same group twice even if a producer published it twice.
* `dead_letter(entry, reason)` moves a malformed entry to `dead` (atomic with its ack) so
  valid entries keep flowing; `consume_messages` does this for undecodable protobufs.

Trimming (why not XADD MAXLEN ~): MAXLEN drops the oldest entries whether or not every
consumer group has read them, so a slow stage would silently lose work. Instead, after
acks the bus trims each stream with XTRIM MINID to the oldest id some group still needs:
per group, its oldest pending id if it has pending entries, else the id after its
last-delivered id; the minimum over groups. Entries below that have been delivered to and
acknowledged by every group, so trimming can never lose data. A stream without groups is
never trimmed, and groups are created at id 0 (`ensure_groups` before publishing), so
entries written before a stage starts are kept for it. Memory stays bounded because the
only producer of new work is `publish` (each stage turns one entry into one entry), and
`publish` refuses with `BackpressureError` when the stream holds `maxlen` entries that
are still needed; the learner's admission control keeps far fewer in flight. The `dead`
stream has no consumer group: it is capped at `maxlen` (oldest dead letters dropped).

Redis restarts: every call retries on connection errors with exponential backoff (up to
`reconnect_timeout_s`), re-creates consumer groups the server lost (NOGROUP) and re-loads
scripts (redis-py does NOSCRIPT). After a reconnect a consumer first re-reads its own
pending entries, whose replies may have been lost. Durability across a restart needs
persistence on the server (the embedded Redis runs with appendonly yes).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Sequence, TypeVar

import redis
from google.protobuf.message import Message

from rlrt_core.stages import DEAD_STREAM, PIPELINE_STREAMS, STAGE_GROUPS, STREAM_NAMES
from rlrt_core.transport.codec import Limits, MalformedMessage, decode

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
T = TypeVar("T")

# Atomic "outputs + ack" (also dead letters and dedupe).
# KEYS: input stream, done-set, output streams...
# ARGV: group, consumer, entry id, dedupe member ("" = none), then per output:
#       maxlen ("0" = no cap), number of field/value pairs, pairs...
_ACK_LUA = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 'not_owner' end
if ARGV[4] ~= '' and redis.call('SADD', KEYS[2], ARGV[4]) == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  return 'duplicate'
end
local a = 5
for i = 3, #KEYS do
  local maxlen = tonumber(ARGV[a])
  local n = tonumber(ARGV[a + 1])
  local cmd = {'XADD', KEYS[i]}
  if maxlen > 0 then
    table.insert(cmd, 'MAXLEN'); table.insert(cmd, '~'); table.insert(cmd, maxlen)
  end
  table.insert(cmd, '*')
  for j = a + 2, a + 1 + 2 * n do table.insert(cmd, ARGV[j]) end
  redis.call(unpack(cmd))
  a = a + 2 + 2 * n
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 'ok'
"""

# Trim a stream to the oldest id any consumer group still needs (see module docstring).
_TRIM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local best_ms, best_seq = nil, nil
for _, g in ipairs(groups) do
  local name, pending, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'pending' then pending = g[i + 1]
    elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local ms, seq
  if pending > 0 then
    local s = redis.call('XPENDING', KEYS[1], name)
    ms, seq = string.match(s[2], '(%d+)-(%d+)')
    ms, seq = tonumber(ms), tonumber(seq)
  else
    ms, seq = string.match(last, '(%d+)-(%d+)')
    ms, seq = tonumber(ms), tonumber(seq) + 1
  end
  if best_ms == nil or ms < best_ms or (ms == best_ms and seq < best_seq) then
    best_ms, best_seq = ms, seq
  end
end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', best_ms, best_seq))
"""

# Reset the idle time of entries this consumer still owns (JUSTID: no delivery bump).
# KEYS: stream; ARGV: group, consumer, ids...
_TOUCH_LUA = """
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""

_RETRYABLE = (redis.ConnectionError, redis.TimeoutError)
StreamStats = dict[str, Any]  # see StreamBus.stats


class AckStatus(str, Enum):
    OK = "ok"                # outputs written, input acknowledged
    DUPLICATE = "duplicate"  # dedupe id already done: input acknowledged, nothing written
    NOT_OWNER = "not_owner"  # entry no longer pending for this consumer (reclaimed or acked): nothing written


class BackpressureError(RuntimeError):
    """`publish` refused: the stream already holds `maxlen` entries some stage still needs."""


@dataclass(frozen=True)
class Entry:
    """One delivered stream entry. `payload` is the protobuf bytes (None if the entry was
    deleted while pending); `type` the message's full name as written by the producer
    ("" for raw bytes); `deliveries` counts deliveries including this one."""

    stream: str
    id: str
    group: str
    consumer: str
    type: str
    payload: bytes | None
    deliveries: int = 1
    fields: dict[str, bytes] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class DeadLetter:
    id: str
    source: str
    source_id: str
    group: str
    reason: str
    deliveries: int
    type: str
    payload: bytes | None
    gid: str = ""       # group id of the entry, when its producer wrote one
    kind: str = ""


def default_consumer_name(prefix: str = "") -> str:
    """A consumer name unique to this process: `{prefix}{host}-{pid}-{random}`."""
    return f"{prefix}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


Outputs = Sequence[tuple[str, Message | bytes]]


class StreamBus:
    """Named streams of one run with consumer groups, atomic acks and dead letters.

    client: a redis-py client with `decode_responses=False`; `StreamBus.from_url` makes one.
    maxlen: bound on still-needed entries per stream before `publish` raises
    `BackpressureError`. claim_idle_ms: a pending entry idle this long is reclaimed by the
    next consumer. max_deliveries: deliveries after which an entry is dead-lettered.
    block_ms: default blocking time of `consume`. reconnect_timeout_s: how long calls keep
    retrying while Redis is unreachable. trim_every: acks per stream between trims.
    """

    def __init__(self, client: redis.Redis, run: str, *, prefix: str = "rlrt", maxlen: int = 10_000,
                 claim_idle_ms: int = 60_000, max_deliveries: int = 5, block_ms: int = 1_000,
                 reconnect_timeout_s: float = 60.0, trim_every: int = 64) -> None:
        if client.get_encoder().decode_responses:
            raise ValueError("StreamBus needs a redis client with decode_responses=False (payloads are bytes)")
        if not run or ":" in run:
            raise ValueError(f"run name {run!r} must be non-empty and contain no ':'")
        self.client = client
        self.run = run
        self.prefix = prefix
        self.maxlen = maxlen
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.block_ms = block_ms
        self.reconnect_timeout_s = reconnect_timeout_s
        self.trim_every = max(1, trim_every)
        self._ack_script = client.register_script(_ACK_LUA)
        self._trim_script = client.register_script(_TRIM_LUA)
        self._touch_script = client.register_script(_TOUCH_LUA)
        self._groups: set[tuple[str, str]] = set()
        # (name, group, consumer) -> id after which to re-read own pending entries; absent = done.
        self._own_history: dict[tuple[str, str, str], str] = {}
        self._known_consumers: set[tuple[str, str, str]] = set()
        self._own_retry: dict[tuple[str, str, str], str] = {}  # re-reads that are not deliveries
        self._acks_since_trim: dict[str, int] = {}
        self.reconnects = 0
        # Observers for metrics (set by the owner): entries reclaimed from idle consumers and
        # entries dead-lettered by the bus itself, per stream / kind.
        self.on_claim: Callable[[str, int], None] | None = None
        self.on_dead_letter: Callable[[str, str], None] | None = None

    @classmethod
    def from_url(cls, url: str, run: str, **kwargs: Any) -> "StreamBus":
        """Connect to `url` (redis://[user:password@]host:port/db, rediss://, unix://path);
        credentials and TLS come from the URL."""
        block_ms = kwargs.get("block_ms", 1_000)
        client = redis.Redis.from_url(url, decode_responses=False, socket_timeout=block_ms / 1000 + 10,
                                      socket_connect_timeout=5, health_check_interval=30)
        return cls(client, run, **kwargs)

    @classmethod
    def from_config(cls, transport: Any, run: str, *, url: str | None = None, **kwargs: Any) -> "StreamBus":
        """Build from a `TransportConfig`; `url` overrides `transport.redis_url` (e.g. embedded)."""
        url = url or transport.redis_url
        if not url:
            raise ValueError("no Redis URL: set transport.redis_url / REDIS_URL or start the embedded Redis")
        opts = dict(prefix=transport.stream_prefix, maxlen=transport.stream_maxlen,
                    claim_idle_ms=transport.claim_idle_ms, max_deliveries=transport.max_deliveries,
                    block_ms=transport.block_ms)
        opts.update(kwargs)
        return cls.from_url(url, run, **opts)

    # -- names --------------------------------------------------------------------------

    def key(self, name: str) -> str:
        """Redis key of stream `name` of this run."""
        if name not in STREAM_NAMES:
            raise ValueError(f"unknown stream {name!r}; expected one of {STREAM_NAMES}")
        return f"{self.prefix}:{self.run}:{name}"

    def done_key(self, group: str) -> str:
        """Redis set of ids group `group` has finished (dedupe)."""
        return f"{self.prefix}:{self.run}:done:{group}"

    # -- retries --------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], *, groups: Iterable[tuple[str, str]] = ()) -> T:
        """Run `fn`, retrying on connection loss (backoff) and re-creating lost groups."""
        deadline = time.monotonic() + self.reconnect_timeout_s
        delay = 0.05
        regrouped = False
        while True:
            try:
                return fn()
            except _RETRYABLE as err:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("redis unavailable (%s); retrying in %.2fs", err, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                self.reconnects += 1
                # Replies may have been lost: re-read own pending entries on the next consume,
                # without charging them a delivery (a Redis blip is not the entries' fault).
                for k in self._known_consumers:
                    self._own_retry.setdefault(k, "-")
            except redis.ResponseError as err:
                if "NOGROUP" not in str(err) or regrouped:
                    raise
                regrouped = True
                for name, group in groups:
                    self._create_group(name, group)

    def _create_group(self, name: str, group: str) -> None:
        try:
            self.client.xgroup_create(self.key(name), group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", group, self.key(name))
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        self._groups.add((name, group))

    def ensure_group(self, name: str, group: str) -> None:
        """Create consumer group `group` on stream `name` at id 0 (idempotent)."""
        self._call(lambda: self._create_group(name, group))

    def ensure_groups(self) -> None:
        """Create every stage's group (`STAGE_GROUPS`); call before the first publish."""
        for name, group in STAGE_GROUPS.items():
            self.ensure_group(name, group)

    # -- producing ------------------------------------------------------------------------

    @staticmethod
    def _fields(message: Message | bytes) -> dict[str, bytes | str]:
        # `gid` (the group id, when the message has one) lets the learner's ledger find which
        # groups are in flight without decoding payloads, and dead letters keep it.
        if isinstance(message, Message):
            fields: dict[str, bytes | str] = {"type": message.DESCRIPTOR.full_name, "data": message.SerializeToString()}
            gid = getattr(message, "group_id", "")
            if gid:
                fields["gid"] = gid
            return fields
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise TypeError(f"stream payloads are protobuf messages or bytes, not {type(message).__name__}")
        return {"type": "", "data": bytes(message)}

    def publish(self, name: str, message: Message | bytes) -> str:
        """Append one message to stream `name`; returns the entry id. Raises
        `BackpressureError` when the stream already holds `maxlen` still-needed entries."""
        return self.publish_many(name, [message])[0]

    def room(self, name: str) -> int:
        """How many more entries `publish` accepts on stream `name` now (trims first if full)."""
        key = self.key(name)
        length = self._call(lambda: self.client.xlen(key))
        if length >= self.maxlen:
            self.trim(name)
            length = self._call(lambda: self.client.xlen(key))
        return max(0, self.maxlen - int(length))

    def publish_many(self, name: str, messages: Sequence[Message | bytes], *,
                     pre: Callable[[Any], None] | None = None) -> list[str]:
        """Append messages in one round trip (pipeline); same backpressure rule as `publish`.
        `pre(pipe)` may queue more commands that run in the same round trip, first."""
        key = self.key(name)
        if name == DEAD_STREAM:
            raise ValueError("use dead_letter() to write to the dead stream")
        if not messages:
            return []
        payloads = [self._fields(m) for m in messages]
        room = self.room(name)
        if len(messages) > room:
            raise BackpressureError(f"stream {key} holds {self.maxlen - room} entries still needed by its consumers; "
                                    f"adding {len(messages)} would exceed maxlen={self.maxlen}")

        def run() -> list[str]:
            pipe = self.client.pipeline(transaction=True)
            n_pre = 0
            if pre is not None:
                before = len(pipe.command_stack)
                pre(pipe)
                n_pre = len(pipe.command_stack) - before
            for fields in payloads:
                pipe.xadd(key, fields)
            return [_s(i) for i in pipe.execute()[n_pre:]]

        return self._call(run)

    # -- consuming ------------------------------------------------------------------------

    def _entry(self, name: str, group: str, consumer: str, entry_id: Any, fields: dict | None,
               deliveries: int) -> Entry:
        fields = {_s(k): v for k, v in (fields or {}).items()} if fields is not None else None
        return Entry(stream=name, id=_s(entry_id), group=group, consumer=consumer,
                     type=_s(fields.get("type", b"")) if fields else "", payload=fields.get("data") if fields else None,
                     deliveries=deliveries, fields=fields or {})

    def _screen(self, entries: list[Entry]) -> list[Entry]:
        """Dead-letter re-delivered entries over the delivery limit; acknowledge ones that were
        deleted from the stream while pending (Redis 6.2 returns them without fields)."""
        out = []
        for e in entries:
            if not e.fields:
                log.warning("entry %s of %s was deleted while pending; acknowledging it", e.id, self.key(e.stream))
                self.client.xack(self.key(e.stream), e.group, e.id)
            elif e.deliveries > self.max_deliveries:
                self.dead_letter(e, f"delivered {e.deliveries} times (max_deliveries={self.max_deliveries}): "
                                    "its consumers kept dying or timing out", kind="max_deliveries")
            else:
                out.append(e)
        return out

    def _reclaim(self, name: str, group: str, consumer: str, count: int) -> list[Entry]:
        """Claim up to `count` entries other consumers have left idle >= claim_idle_ms."""
        key = self.key(name)
        rows = self.client.xpending_range(key, group, min="-", max="+", count=max(100, 4 * count),
                                          idle=self.claim_idle_ms)
        theirs = [r for r in rows if _s(r["consumer"]) != consumer][:count]
        if not theirs:
            return []
        before = {_s(r["message_id"]): int(r["times_delivered"]) for r in theirs}
        # XCLAIM re-checks the idle time: an entry a peer claimed a moment ago is not returned.
        claimed = self.client.xclaim(key, group, consumer, self.claim_idle_ms, list(before))
        entries = [self._entry(name, group, consumer, i, f, before.get(_s(i), 0) + 1) for i, f in claimed]
        if entries and self.on_claim is not None:
            self.on_claim(name, len(entries))
        return self._screen(entries)

    def _own_pending(self, name: str, group: str, consumer: str, count: int) -> list[Entry]:
        """This consumer's own pending entries, `count` at a time, until all were re-read."""
        key = self.key(name)
        mark = (name, group, consumer)
        res = self.client.xreadgroup(group, consumer, {key: self._own_history[mark]}, count=count)
        raw = res[0][1] if res else []
        if len(raw) < count:
            del self._own_history[mark]
        else:
            self._own_history[mark] = _s(raw[-1][0])
        if not raw:
            return []
        ids = [_s(i) for i, _ in raw]
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.xpending_range(key, group, min=i, max=i, count=1)
        counts = [int(r[0]["times_delivered"]) if r else 1 for r in pipe.execute()]
        return self._screen([self._entry(name, group, consumer, i, f, n) for (i, f), n in zip(raw, counts)])

    def consume(self, name: str, group: str, consumer: str, *, count: int = 16,
                block_ms: int | None = None) -> list[Entry]:
        """Up to `count` entries for `consumer` of `group`: first its own pending entries
        (once per bus after start or reconnect), then entries idle longer than
        `claim_idle_ms` on other consumers, then new ones, blocking up to `block_ms`
        (default `self.block_ms`; 0 = do not block) when nothing else is available."""
        if count < 1:
            raise ValueError("count must be >= 1")
        if (name, group) not in self._groups:
            self.ensure_group(name, group)
        block = self.block_ms if block_ms is None else block_ms

        mark = (name, group, consumer)
        if mark not in self._known_consumers:  # first use in this process: re-read what it left pending
            self._known_consumers.add(mark)
            self._own_history[mark] = "0"

        def run() -> list[Entry]:
            out: list[Entry] = []
            if mark in self._own_retry:
                out.extend(self._own_pending_uncounted(name, group, consumer, count))
            if mark in self._own_history and len(out) < count:
                out.extend(self._own_pending(name, group, consumer, count - len(out)))
            if len(out) < count:
                out.extend(self._reclaim(name, group, consumer, count - len(out)))
            if len(out) < count:
                res = self.client.xreadgroup(group, consumer, {self.key(name): ">"}, count=count - len(out),
                                             block=None if out or block <= 0 else block)
                for _, rows in res or []:
                    out.extend(self._entry(name, group, consumer, i, f, 1) for i, f in rows)
            return out

        return self._call(run, groups=[(name, group)])

    def _own_pending_uncounted(self, name: str, group: str, consumer: str, count: int) -> list[Entry]:
        """This consumer's pending entries via XPENDING + XRANGE, which (unlike XREADGROUP
        with an id) leaves delivery counts unchanged; paged by id until all were re-read."""
        key = self.key(name)
        mark = (name, group, consumer)
        rows = self.client.xpending_range(key, group, min=self._own_retry[mark], max="+", count=count,
                                          consumername=consumer)
        if len(rows) < count:
            del self._own_retry[mark]
        else:
            self._own_retry[mark] = "(" + _s(rows[-1]["message_id"])
        out = []
        for r in rows:
            i = _s(r["message_id"])
            got = self.client.xrange(key, min=i, max=i, count=1)
            out.append(self._entry(name, group, consumer, i, got[0][1] if got else {}, int(r["times_delivered"])))
        return self._screen(out)

    def redeliver_pending(self, name: str, group: str, consumer: str, *, count_delivery: bool = True) -> None:
        """Make the next `consume` by `consumer` re-read its own pending entries first.

        Call it after a batch failed half-way (e.g. the weight server was briefly down): the
        batch's entries are still pending for this consumer, and peers only reclaim other
        consumers' entries, so without this they would wait for another worker forever.
        Re-reads count as deliveries, so an entry that keeps failing reaches `max_deliveries`
        and is dead-lettered; with `count_delivery=False` (the failure was the infrastructure's,
        e.g. Redis or the weight server briefly down, not the entry's) they do not."""
        mark = (name, group, consumer)
        self._known_consumers.add(mark)
        if count_delivery:
            self._own_history[mark] = "0"
        else:
            self._own_retry[mark] = "-"

    def consume_messages(self, name: str, group: str, consumer: str, cls: type[M], *, count: int = 16,
                         block_ms: int | None = None, limits: Limits | None = None) -> list[tuple[Entry, M]]:
        """`consume` plus decoding as `cls` and validation (`codec.validate` with `limits`).
        Entries that do not decode, fail validation, carry another message type or belong
        to another run are dead-lettered alone with the reason, so valid ones keep flowing."""
        out = []
        for entry in self.consume(name, group, consumer, count=count, block_ms=block_ms):
            try:
                if entry.type and entry.type != cls.DESCRIPTOR.full_name:
                    raise MalformedMessage(f"entry holds {entry.type}, expected {cls.DESCRIPTOR.full_name}")
                msg = decode(entry.payload, cls, limits=limits)
                run_id = getattr(msg, "run_id", None)
                if run_id is not None and run_id != self.run:
                    raise MalformedMessage(f"message of run {run_id!r} on a stream of run {self.run!r}")
            except MalformedMessage as err:
                log.warning("dead-lettering %s %s: %s", self.key(name), entry.id, err)
                self.dead_letter(entry, str(err), kind="malformed")
                continue
            out.append((entry, msg))
        return out

    def touch(self, entries: Sequence[Entry]) -> int:
        """Reset the idle time of `entries` this consumer still owns, so peers do not reclaim
        work in progress (call more often than `claim_idle_ms`). Returns how many were kept."""
        by_key: dict[tuple[str, str, str], list[str]] = {}
        for e in entries:
            by_key.setdefault((e.stream, e.group, e.consumer), []).append(e.id)
        n = 0
        for (name, group, consumer), ids in by_key.items():
            n += int(self._call(lambda: self._touch_script(keys=[self.key(name)], args=[group, consumer, *ids])))
        return n

    # -- acknowledging ----------------------------------------------------------------------

    def _ack_args(self, entry: Entry, outputs: Outputs, dedupe_id: str | None,
                  extra: Sequence[tuple[str, dict[str, Any]]] = ()) -> tuple[list[str], list[Any]]:
        keys = [self.key(entry.stream), self.done_key(entry.group)]
        args: list[Any] = [entry.group, entry.consumer, entry.id, dedupe_id or ""]
        for name, message in outputs:
            if name == DEAD_STREAM:
                raise ValueError("use dead_letter() to write to the dead stream")
            keys.append(self.key(name))
            fields = self._fields(message)
            args += [0, len(fields)]
            for k, v in fields.items():
                args += [k, v]
        for name, fields in extra:
            keys.append(self.key(name))
            args += [self.maxlen if name == DEAD_STREAM else 0, len(fields)]
            for k, v in fields.items():
                args += [k, v]
        return keys, args

    def _after_acks(self, entries: Sequence[Entry]) -> None:
        for name in {e.stream for e in entries}:
            count = self._acks_since_trim.get(name, 0) + sum(e.stream == name for e in entries)
            if count >= self.trim_every:
                count = 0
                self.trim(name)
            self._acks_since_trim[name] = count

    def ack(self, entry: Entry, outputs: Outputs = (), *, dedupe_id: str | None = None) -> AckStatus:
        """Atomically append `outputs` ((stream name, message or bytes) pairs) and
        acknowledge `entry`, provided `entry` is still pending for its consumer. With
        `dedupe_id`, nothing is written if that id was already done by this group."""
        return self.ack_many([entry], outputs=[outputs], dedupe_ids=None if dedupe_id is None else [dedupe_id])[0]

    def ack_many(self, entries: Sequence[Entry], *, outputs: Sequence[Outputs] | None = None,
                 dedupe_ids: Sequence[str | None] | None = None) -> list[AckStatus]:
        """`ack` for many entries in one round trip: `outputs[i]` and `dedupe_ids[i]` belong
        to `entries[i]`; each entry's outputs + ack is atomic on its own."""
        n = len(entries)
        if outputs is not None and len(outputs) != n:
            raise ValueError(f"{len(outputs)} output lists for {n} entries")
        if dedupe_ids is not None and len(dedupe_ids) != n:
            raise ValueError(f"{len(dedupe_ids)} dedupe ids for {n} entries")
        if not entries:
            return []
        calls = [self._ack_args(e, () if outputs is None else outputs[i], None if dedupe_ids is None else dedupe_ids[i])
                 for i, e in enumerate(entries)]

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                self._ack_script(keys=keys, args=args, client=pipe)
            return pipe.execute()

        statuses = [AckStatus(_s(r)) for r in self._call(run, groups={(e.stream, e.group) for e in entries})]
        self._after_acks(entries)
        return statuses

    def dead_letter(self, entry: Entry, reason: str, *, kind: str = "invalid") -> AckStatus:
        """Move `entry` to the `dead` stream with `reason`, atomically with its ack. `kind`
        is a short label for metrics (`on_dead_letter`), e.g. "malformed", "invalid"."""
        fields: dict[str, Any] = {"source": entry.stream, "source_id": entry.id, "group": entry.group,
                                  "consumer": entry.consumer, "reason": reason, "deliveries": entry.deliveries,
                                  "type": entry.type, "kind": kind, "at": f"{time.time():.6f}"}
        if entry.payload is not None:
            fields["data"] = entry.payload
        gid = entry.fields.get("gid")
        if gid:
            fields["gid"] = gid
        keys, args = self._ack_args(entry, (), None, extra=[(DEAD_STREAM, fields)])
        status = AckStatus(_s(self._call(lambda: self._ack_script(keys=keys, args=args),
                                         groups=[(entry.stream, entry.group)])))
        if status is AckStatus.OK and self.on_dead_letter is not None:
            self.on_dead_letter(entry.stream, kind)
        return status

    def seen(self, ids: Sequence[str], group: str = "learner") -> list[bool]:
        """Whether each id is already in `group`'s done-set (see `ack(dedupe_id=...)`)."""
        if not ids:
            return []
        flags = self._call(lambda: self.client.smismember(self.done_key(group), list(ids)))
        return [bool(f) for f in flags]

    # -- maintenance and metrics ----------------------------------------------------------

    def trim(self, name: str) -> int:
        """Drop entries every consumer group of `name` has acknowledged; returns how many."""
        key = self.key(name)
        return int(self._call(lambda: self._trim_script(keys=[key], args=[])))

    @staticmethod
    def _dead(entry_id: Any, raw: dict) -> DeadLetter:
        f = {_s(k): v for k, v in raw.items()}
        return DeadLetter(id=_s(entry_id), source=_s(f.get("source", b"")), source_id=_s(f.get("source_id", b"")),
                          group=_s(f.get("group", b"")), reason=_s(f.get("reason", b"")),
                          deliveries=int(f.get("deliveries", 0)), type=_s(f.get("type", b"")), payload=f.get("data"),
                          gid=_s(f.get("gid", b"")), kind=_s(f.get("kind", b"")))

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The newest `count` dead letters, newest first."""
        rows = self._call(lambda: self.client.xrevrange(self.key(DEAD_STREAM), count=count))
        return [self._dead(i, raw) for i, raw in rows]

    def dead_letters_after(self, after_id: str = "0-0", count: int = 1000) -> list[DeadLetter]:
        """Dead letters with ids after `after_id`, oldest first (to follow the stream)."""
        rows = self._call(lambda: self.client.xrange(self.key(DEAD_STREAM), min=f"({after_id}", max="+", count=count))
        return [self._dead(i, raw) for i, raw in rows]

    def in_flight_ids(self) -> set[str]:
        """Group ids of every unfinished entry of the pipeline streams (pending for a consumer
        or not yet delivered to the stage's group). Streams are read upstream first: entries
        only ever move downstream, so one that moves during the scan is seen at least once.
        Costs a read of every in-flight entry: meant for recovery, not for every round."""

        def gid_of(fields: dict) -> str:
            f = {_s(k): v for k, v in fields.items()}
            if "gid" in f:
                return _s(f["gid"])
            try:  # an entry written without the field: decode it
                from rlrt_core.proto import trajectory_pb2 as pb

                cls = pb.PromptTask if _s(f.get("type", b"")).endswith("PromptTask") else pb.RolloutGroup
                return cls.FromString(bytes(f.get("data", b""))).group_id
            except Exception:
                return ""

        def run() -> set[str]:
            out: set[str] = set()
            for name in PIPELINE_STREAMS:
                key, group = self.key(name), STAGE_GROUPS[name]
                if not self.client.exists(key):
                    continue
                groups = {_s(g["name"]): g for g in self.client.xinfo_groups(key)}
                if group not in groups:  # never read: everything in the stream is in flight
                    rows = self.client.xrange(key, min="-", max="+")
                    out.update(gid_of(f) for _, f in rows)
                    continue
                last = _s(groups[group]["last-delivered-id"])
                start = "-"
                while True:
                    pend = self.client.xpending_range(key, group, min=start, max="+", count=500)
                    for r in pend:
                        i = _s(r["message_id"])
                        got = self.client.xrange(key, min=i, max=i, count=1)
                        if got:
                            out.add(gid_of(got[0][1]))
                    if len(pend) < 500:
                        break
                    start = "(" + _s(pend[-1]["message_id"])
                for _, f in self.client.xrange(key, min=f"({last}", max="+"):
                    out.add(gid_of(f))
            out.discard("")
            return out

        return self._call(run)

    def stats(self) -> dict[str, StreamStats]:
        """Per stream (JSON-ready): {"key", "length", "groups": {group: {"pending", "lag",
        "consumers", "last_delivered_id"}}}. `lag` = entries not yet delivered to the group;
        pending + lag = entries the group still has to finish."""

        def run() -> dict[str, StreamStats]:
            out = {}
            for name in STREAM_NAMES:
                key = self.key(name)
                length = int(self.client.xlen(key))
                groups: dict[str, dict[str, Any]] = {}
                if self.client.exists(key):
                    for g in self.client.xinfo_groups(key):
                        last = _s(g["last-delivered-id"])
                        lag = g.get("lag")
                        if lag is None:  # Redis 6.2 has no lag field (nor 7.x after some deletions)
                            lag = len(self.client.xrange(key, min=f"({last}", max="+", count=self.maxlen + 1))
                        groups[_s(g["name"])] = {"pending": int(g["pending"]), "lag": int(lag),
                                                 "consumers": int(g["consumers"]), "last_delivered_id": last}
                out[name] = {"key": key, "length": length, "groups": groups}
            return out

        return self._call(run)

    def backlog(self, names: Sequence[str] = PIPELINE_STREAMS) -> int:
        """Entries the stage groups (`STAGE_GROUPS`) of `names` still have to finish (pending
        + not yet delivered). Each in-flight prompt group is exactly one such entry (every
        stage writes its output atomically with its ack), so this is the learner's true
        in-flight count, e.g. for `AdmissionController.reconcile` after a restart."""
        stats = self.stats()
        total = 0
        for name in names:
            g = stats[name]["groups"].get(STAGE_GROUPS[name])
            if g is None:  # no group yet: everything in the stream is still to be read
                total += stats[name]["length"]
            else:
                total += g["pending"] + g["lag"]
        return total

    def delete_run(self) -> int:
        """Delete every key of this run (streams, done-sets); returns the number deleted."""
        keys = self._call(lambda: list(self.client.scan_iter(match=f"{self.prefix}:{self.run}:*", count=1000)))
        return int(self._call(lambda: self.client.delete(*keys))) if keys else 0
