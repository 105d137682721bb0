"""Weight relays: fan-out that does not load the learner.

A relay follows the run's version announcements, pulls each new version once from its
upstream (the learner, or another relay) -- a delta from the version it holds when it has
one, else in full, sha256-verified by `WeightClient.pull` -- and serves it to its own
clients with an ordinary `WeightServer` (same wire format, full and delta streams, the same
`keep_versions`, the same token interceptor and TLS): the learner sends one copy per
version per relay instead of one per worker. One relay per node (a k8s DaemonSet, a
compose service) keeps the copy to the workers on the node's loopback or LAN.

Registry (Redis): every relay writes `{prefix}:{run}:weights:relay:{id}` (JSON: address,
node, versions held, bytes sent, last_seen) with a TTL of `relay.ttl_s`, refreshed every
`relay.heartbeat_s` and right after each new version, and adds its id to the set
`{prefix}:{run}:weights:relays`. A relay that dies disappears from `live_relays` when its
key expires; one that stops cleanly removes itself.

Workers (`transport.weights_relay: auto`) order the live relays with `order_relays`: relays
on their own node first, the others by rendezvous hash of (worker id, relay id) so the
workers of a node-less deployment spread evenly and keep their relay while it lives. The
learner comes last. `RelaySources` walks that order for one version: it waits (up to
`transport.weights_relay_wait_s`) for a live relay to list the version, and moves to the
next source when the relay dies, errs, or is still behind.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from rlrt_core.weights.announce import read_announcement
from rlrt_core.weights.records import (  # noqa: F401 - the registry, re-exported here
    RelayRecord,
    live_relays,
    register_relay,
    relay_key,
    relays_key,
    unregister_relay,
)
from rlrt_core.weights.client import HeldVersion, WeightClient, WeightServiceError
from rlrt_core.weights.server import WeightServer

log = logging.getLogger(__name__)


def _score(worker_id: str, relay_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{worker_id}\0{relay_id}".encode()).digest()[:8], "big")


def order_relays(relays: list[RelayRecord], *, worker_id: str, node: str) -> list[RelayRecord]:
    """The order a worker tries relays in: those on `node` first, then the rest; within each,
    by rendezvous hash of (worker_id, relay_id) (stable, and spread evenly across workers)."""
    return sorted(relays, key=lambda r: (r.node != node, -_score(worker_id, r.relay_id)))


def node_name(configured: str | None) -> str:
    """The node a worker or relay runs on: the configured name (k8s: the pod's spec.nodeName),
    else this host's name."""
    return configured or socket.gethostname()


# -- worker side ------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    kind: str      # "relay" | "learner"
    target: str    # host:port
    relay_id: str = ""


class RelaySources:
    """Where one worker pulls a version from, in order, with the waits and fallbacks.

    redis / run / prefix: where the relay registry lives. worker_id, node: this worker's id
    and node (`order_relays`). wait_s: how long to wait for a live relay to hold a version
    before the next source; poll_s: registry polling period while waiting.
    on_fallback(reason): called each time a relay is passed over ("unavailable": gone or
    failed; "behind": it did not hold the version within wait_s).
    """

    def __init__(self, redis: Any, run: str, *, worker_id: str, node: str, prefix: str = "rlrt",
                 wait_s: float = 30.0, poll_s: float = 0.1,
                 on_fallback: Callable[[str], None] | None = None) -> None:
        self.redis, self.run, self.prefix = redis, run, prefix
        self.worker_id, self.node = worker_id, node
        self.wait_s, self.poll_s = wait_s, poll_s
        self.on_fallback = on_fallback or (lambda _reason: None)

    def _record(self, relay_id: str) -> RelayRecord | None:
        raw = self.redis.get(relay_key(self.run, relay_id, self.prefix))
        return None if raw is None else RelayRecord.from_json(raw)

    def wait_until_held(self, relay_id: str, version: int, deadline: float | None = None) -> str:
        """"ok" once the relay lists `version` (or a newer one), "unavailable" when its record
        expires, "behind" at `deadline` (monotonic; default wait_s from now) -- extended while
        the relay says it is pulling that version (a big version takes long; a relay that dies
        meanwhile expires)."""
        deadline = time.monotonic() + self.wait_s if deadline is None else deadline
        while True:
            rec = self._record(relay_id)
            if rec is None:
                return "unavailable"
            if rec.versions and max(rec.versions) >= version:
                return "ok"
            if rec.pulling >= version:
                deadline = max(deadline, time.monotonic() + self.poll_s)
            elif time.monotonic() >= deadline:
                return "behind"
            time.sleep(self.poll_s)

    def relays(self) -> list[Source]:
        ordered = order_relays(live_relays(self.redis, self.run, prefix=self.prefix),
                               worker_id=self.worker_id, node=self.node)
        return [Source("relay", r.address, r.relay_id) for r in ordered]

    def fallback(self, source: Source, reason: str, detail: str = "") -> None:
        log.warning("weight relay %s (%s) passed over: %s%s", source.relay_id, source.target, reason,
                    f" ({detail})" if detail else "")
        self.on_fallback(reason)

    def candidates(self, version: int, learner: str) -> Iterator[Source]:
        """Sources to try for `version`, best first; each relay is yielded only once it holds
        the version (the wait and the pass-overs happen here); the learner last. The caller
        reports a failed pull with `fallback(source, "unavailable")` and asks for the next."""
        # One wait for all relays: the next relay is tried at once, not after another wait_s.
        deadline = time.monotonic() + self.wait_s
        for src in self.relays():
            state = self.wait_until_held(src.relay_id, version, deadline)
            if state != "ok":
                self.fallback(src, state, f"version {version}")
                continue
            yield src
        yield Source("learner", learner)


# -- the relay ----------------------------------------------------------------------------


class WeightRelay:
    """Follows announcements, pulls each version once from upstream, serves it with `server`.

    server: a started-or-not `WeightServer` (its token, TLS and keep_versions are the
    relay's). make_client(target): a `WeightClient` to an upstream address (carries the run's
    token and TLS CA). upstream: a fixed upstream address (another relay, or a pinned
    learner address); None = the address in the learner's announcement. The learner's
    announced address is also the fallback when a fixed upstream fails.

    What a service reads to report on it (the admin app, metrics): `announced` (the newest
    announced version seen, None before one), `behind_since` (monotonic time since which the
    relay has lagged the announcement, None when it holds it), `beat_failures` (consecutive
    failed registry writes) and `last_beat_ok` (monotonic time of the last good one),
    `upstream_failures` (pulls from one upstream that failed or found it behind) and
    `last_error`. `on_pulled(kind, nbytes, seconds)` and `on_upstream_failure(target, err)`
    are called as those happen.
    """

    def __init__(self, server: WeightServer, redis: Any, run: str, *, make_client: Callable[[str], WeightClient],
                 relay_id: str, advertise: str, node: str, prefix: str = "rlrt", upstream: str | None = None,
                 ttl_s: float = 15.0, heartbeat_s: float = 5.0, poll_s: float = 0.2) -> None:
        if heartbeat_s >= ttl_s:
            raise ValueError(f"relay heartbeat_s ({heartbeat_s}) must be shorter than ttl_s ({ttl_s})")
        self.server, self.redis, self.run_name, self.prefix = server, redis, run, prefix
        self.make_client = make_client
        self.relay_id, self.advertise, self.node = relay_id, advertise, node
        self.upstream, self.ttl_s, self.heartbeat_s, self.poll_s = upstream, ttl_s, heartbeat_s, poll_s
        self.held: HeldVersion | None = None
        self.pulled_bytes = 0
        self.pulls: dict[str, int] = {"full": 0, "delta": 0, "fallback": 0}
        self._clients: dict[str, WeightClient] = {}
        self._pulling = -1
        self._failed = -1  # the last version whose pull failed
        self.announced: int | None = None
        self.behind_since: float | None = None
        self.beat_failures = 0
        self.last_beat_ok: float | None = None
        self.upstream_failures = 0
        self.last_error = ""
        self.on_pulled: Callable[[str, int, float], None] = lambda _kind, _nbytes, _seconds: None
        self.on_upstream_failure: Callable[[str, Exception], None] = lambda _target, _err: None

    @property
    def pulling(self) -> int:
        """The version being pulled from upstream right now (-1: none)."""
        return self._pulling

    def _client(self, target: str) -> WeightClient:
        c = self._clients.get(target)
        if c is None:
            c = self._clients[target] = self.make_client(target)
        return c

    def record(self) -> RelayRecord:
        return RelayRecord(self.relay_id, self.advertise, self.node, tuple(self.server.versions), time.time(),
                           self.server.bytes_sent, self.pulled_bytes, self._pulling)

    def heartbeat(self) -> None:
        try:
            register_relay(self.redis, self.run_name, self.record(), ttl_s=self.ttl_s, prefix=self.prefix)
        except Exception:
            self.beat_failures += 1
            raise
        self.beat_failures, self.last_beat_ok = 0, time.monotonic()

    def sync_once(self) -> int | None:
        """Pull the announced version if it is newer than the latest served; returns the
        version now served (None before the first)."""
        a = read_announcement(self.redis, self.run_name, prefix=self.prefix)
        latest = self.server.latest_version
        if a is not None:
            self.announced = a.version if self.announced is None else max(self.announced, a.version)
        if a is None or (latest is not None and a.version <= latest):
            self.behind_since = None
            return latest
        if self.behind_since is None:
            self.behind_since = time.monotonic()
        targets = [t for t in (self.upstream, a.address) if t]
        if not targets:
            raise WeightServiceError(f"version {a.version} was announced without an address and relay.upstream "
                                     "is not set: nowhere to pull from")
        # Workers waiting for this version keep waiting while it comes -- unless pulling it
        # failed before: then their own wait_s decides, rather than a relay retrying forever.
        if a.version != self._failed:
            self._pulling = a.version
            self._beat_quietly()
        try:
            return self._pull_announced(a.version, targets)
        except Exception:
            self._failed = a.version
            if self._pulling >= 0:  # say at once that it is not coming from here
                self._pulling = -1
                self._beat_quietly()
            raise
        finally:
            self._pulling = -1

    def _beat_quietly(self) -> None:
        try:
            self.heartbeat()
        except Exception as err:  # Redis away: the pull itself may still work
            log.warning("relay %s: heartbeat failed: %s", self.relay_id, err)

    def _pull_announced(self, version: int, targets: list[str]) -> int:
        last: Exception | None = None
        for target in dict.fromkeys(targets):
            # The held copy is consumed by a delta pull: a failure leaves nothing trusted behind.
            held, self.held = self.held, None
            t0 = time.perf_counter()
            try:
                pulled = self._client(target).pull(version, held=held)
            except WeightServiceError as err:
                if getattr(err, "held_intact", False):
                    self.held = held
                log.warning("relay %s: pulling version %d from %s failed: %s", self.relay_id, version, target, err)
                last = err
                self._upstream_failed(target, err)
                continue
            if pulled.version < version:  # an upstream relay that is behind: try the next one
                self.held = pulled.held
                last = WeightServiceError(f"{target} served version {pulled.version}, not {version}")
                self._upstream_failed(target, last)
                continue
            self._serve(pulled.held)
            self.pulled_bytes += pulled.bytes_received
            self.pulls[pulled.kind] += 1
            if self.announced is None or pulled.version >= self.announced:
                self.behind_since = None
            self.last_error = ""
            self.on_pulled(pulled.kind, pulled.bytes_received, time.perf_counter() - t0)
            log.info("relay %s: serving version %d (%s pull from %s, %d bytes)", self.relay_id, pulled.version,
                     pulled.kind, target, pulled.bytes_received)
            self.heartbeat()  # workers waiting on the registry see the version now
            return pulled.version
        assert last is not None
        raise last

    def _upstream_failed(self, target: str, err: Exception) -> None:
        self.upstream_failures += 1
        self.last_error = f"{target}: {err}"
        self.on_upstream_failure(target, err)

    def _serve(self, held: HeldVersion) -> None:
        # The server copies the held bytes into its own version buffer (no cast: the
        # published dtype stays), so the next delta may rebuild `held` in place.
        self.server.publish(held.version, dict(held.items()))
        served = self.server.checksum(held.version)
        if served != held.checksum:  # the same bytes must hash the same: a bug, not a network fault
            raise RuntimeError(f"relay {self.relay_id}: version {held.version} re-served with checksum "
                               f"{served[:16]}…, upstream {held.checksum[:16]}…")
        self.held = held

    def run(self, stop: threading.Event, on_error: Callable[[BaseException], None] | None = None,
            on_round: Callable[[], None] | None = None) -> None:
        """Follow announcements until `stop` is set. Heartbeats run on their own thread, so
        the record stays alive during a pull that outlasts the TTL. `on_round()` is called
        after each round of the loop (a service's liveness beat, its metrics)."""
        def beat() -> None:
            while not stop.is_set():
                try:
                    self.heartbeat()
                except Exception as err:  # Redis away: the record may expire; keep trying
                    log.warning("relay %s: heartbeat failed: %s", self.relay_id, err)
                stop.wait(self.heartbeat_s)

        beater = threading.Thread(target=beat, name=f"relay-heartbeat-{self.relay_id}", daemon=True)
        beater.start()
        backoff = self.poll_s
        try:
            while not stop.is_set():
                try:
                    self.sync_once()
                    self.last_error = ""
                    backoff = self.poll_s
                except Exception as err:  # upstream or Redis away: keep serving what we hold, retry
                    self.last_error = str(err)
                    if on_error is not None:
                        on_error(err)
                    log.warning("relay %s: %s (retrying in %.1fs)", self.relay_id, err, backoff)
                    backoff = min(max(backoff * 2, 0.5), 10.0)
                if on_round is not None:
                    try:
                        on_round()
                    except Exception:  # reporting must not stop the relay
                        log.warning("relay %s: on_round failed", self.relay_id, exc_info=True)
                stop.wait(backoff)
        finally:
            stop.set()
            beater.join(timeout=self.heartbeat_s + 5)

    def close(self, *, unregister: bool = True) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        if unregister:
            try:
                unregister_relay(self.redis, self.run_name, self.relay_id, prefix=self.prefix)
            except Exception as err:
                log.warning("relay %s: could not unregister: %s", self.relay_id, err)
