"""Weight relay service: a thin adapter around `rlrt_core.weights.relay.WeightRelay` that wires
it to Redis (announcements, the relay registry) and to a `WeightServer` built from the run's
transport settings (token, TLS, keep_versions, chunk size, delta encoding), bound on
`relay.host:relay.port` (0 = a free port; a taken fixed port is retried, then reported).

Its upstream is the address the learner announces (or `relay.upstream`); its clients find
it in the registry (`transport.weights_relay: auto`). Stopping it (SIGTERM) removes its
record; a killed relay's record expires after `relay.ttl_s`.

Like every service it runs the admin app (services/common/admin.py) on
`metrics.http_host:metrics.http_port`: /healthz, /readyz, /status and /metrics with the
`rlrt_relay_*` series; `RelayReport` says what they show.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from rlrt_core.config import RunConfig

log = logging.getLogger("rlrt.relay")


def _advertised(cfg: RunConfig, port: int) -> str:
    rc = cfg.relay
    host = rc.advertise or rc.host
    if host in ("0.0.0.0", "::", "[::]", ""):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = socket.gethostname()
    return f"{host}:{port}"


def start_relay_server(cfg: RunConfig):
    """A started WeightServer on relay.host:relay.port with the run's token and TLS."""
    from rlrt_core.weights.server import WeightServer

    return WeightServer.start_from_config(cfg.transport, field="relay.port", host=cfg.relay.host, port=cfg.relay.port)


class RelayReport:
    """Turns the relay's state into what the admin app serves: metrics (counters advanced by
    the change since the last round), readiness, liveness progress, and the /status body.

    Ready once it holds a version, unless its registry record has expired (Redis unreachable
    for relay.ttl_s: workers cannot find it) or it has lagged the announced version for more
    than relay.max_behind_s (its upstream unreachable or too slow). Progress (liveness) is a
    good registry write or a version served; while writes fail it waits for Redis, so
    /healthz fails after metrics.stall_timeout_s of failed writes, as other services do when
    Redis stays away. An unreachable upstream makes it unready, not unhealthy: a restart
    would not bring the learner back.
    """

    def __init__(self, rt, relay, server, cfg: RunConfig) -> None:
        self.rt, self.relay, self.server, self.cfg = rt, relay, server, cfg
        self.m = rt.metrics
        self._lock = threading.Lock()  # refresh() runs on the relay loop and on the reporter thread
        self._sent = 0
        self._streams = {"full": 0, "delta": 0}
        self._beat_ok: float | None = None
        self._version: int | None = None
        relay.on_pulled = self._pulled
        relay.on_upstream_failure = lambda _target, _err: self.m.relay_upstream_failures.inc()

    def _pulled(self, kind: str, nbytes: int, seconds: float) -> None:
        self.m.relay_pulls.labels(kind=kind).inc()
        self.m.relay_pulled_bytes.inc(nbytes)
        self.m.relay_pull_seconds.observe(seconds)

    def round(self) -> None:
        """Called after every round of the relay's loop (and before it starts): the main
        loop's liveness beat, then a refresh."""
        self.rt.state.beat()
        self.refresh()

    def run_reporter(self, stop: threading.Event, every_s: float = 0.5) -> threading.Thread:
        """Refresh every `every_s` on a thread of its own: the relay's loop may sleep up to
        10 s between rounds while its upstream or Redis is away, and readiness must not wait."""
        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    self.refresh()
                except Exception:  # reporting must never take the relay down
                    log.warning("relay report failed", exc_info=True)

        t = threading.Thread(target=loop, name="relay-report", daemon=True)
        t.start()
        return t

    def refresh(self) -> None:
        """Metrics (counters advanced by what changed), progress, what it waits for, readiness."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        r, s, m = self.relay, self.server, self.m
        sent = s.bytes_sent
        if sent > self._sent:
            m.relay_sent_bytes.inc(sent - self._sent)
            self._sent = sent
        for kind, n in list(s.streams.items()):
            if n > self._streams.get(kind, 0):
                m.relay_client_streams.labels(kind=kind).inc(n - self._streams.get(kind, 0))
                self._streams[kind] = n
        versions = s.versions
        latest = versions[-1] if versions else None
        m.relay_weight_version.set(-1 if latest is None else latest)
        m.relay_held_versions.set(len(versions))
        m.relay_announced_version.set(-1 if r.announced is None else r.announced)
        if r.last_beat_ok is not None and r.last_beat_ok != self._beat_ok:
            self._beat_ok = r.last_beat_ok
            self.rt.progressed()
        if latest is not None and latest != self._version:
            self._version = latest
            self.rt.progressed()
        self.rt.wait_for("redis (relay registry)" if r.beat_failures else None)
        ready, reason = self.readiness(latest)
        self.rt.set_ready(ready, reason)

    def readiness(self, latest: int | None) -> tuple[bool, str]:
        r, rc = self.relay, self.cfg.relay
        now = time.monotonic()
        if r.beat_failures and (r.last_beat_ok is None or now - r.last_beat_ok > rc.ttl_s):
            return False, (f"its registry record is gone: {r.beat_failures} failed writes to Redis "
                           "(workers cannot find it)")
        if latest is None:
            what = "no version announced yet" if r.announced is None else f"version {r.announced} announced"
            return False, f"holds no weight version yet ({what}{'; ' + r.last_error if r.last_error else ''})"
        if r.behind_since is not None and now - r.behind_since > rc.max_behind_s:
            return False, (f"holds version {latest}, version {r.announced} announced: behind for "
                           f"{now - r.behind_since:.0f}s "
                           f"(relay.max_behind_s={rc.max_behind_s:g}){'; ' + r.last_error if r.last_error else ''}")
        return True, f"serving version {latest}"

    def status(self) -> dict:
        r, s = self.relay, self.server
        versions = s.versions
        pulls = dict(r.pulls)
        return {"version": versions[-1] if versions else None, "versions": versions, "announced": r.announced,
                "address": r.advertise, "node": r.node, "upstream": r.upstream or "learner (announced address)",
                "pulling": r.pulling, "processed": sum(pulls.values()),
                "counters": {"bytes_sent": s.bytes_sent, "pulled_bytes": r.pulled_bytes,
                             **{f"pulls_{k}": v for k, v in pulls.items()},
                             "client_streams": sum(s.streams.values()), "upstream_failures": r.upstream_failures},
                "registry_write_failures": r.beat_failures, "last_error": r.last_error or None}


def run(cfg: RunConfig, worker: str) -> int:
    from rlrt_core.weights.client import WeightClient
    from rlrt_core.weights.relay import WeightRelay, node_name
    from services.common.runtime import ServiceRuntime, setup_logging

    setup_logging(worker)
    t = cfg.transport
    try:
        server = start_relay_server(cfg)
    except (RuntimeError, ValueError, OSError) as err:  # port in use, no token, unreadable TLS files
        log.error("%s", err)
        return 2
    rt = ServiceRuntime("relay", cfg, worker)
    try:
        redis = rt.redis
    except ValueError as err:  # no transport.redis_url: the relay has no embedded Redis of its own
        log.error("%s", err)
        server.stop()
        return 2
    relay = WeightRelay(server, redis, cfg.run_name,
                        make_client=lambda target: WeightClient.from_config(t, target=target),
                        relay_id=worker, advertise=_advertised(cfg, server.port), node=node_name(t.weights_node),
                        prefix=t.stream_prefix, upstream=cfg.relay.upstream, ttl_s=cfg.relay.ttl_s,
                        heartbeat_s=cfg.relay.heartbeat_s, poll_s=cfg.relay.poll_s)
    report = RelayReport(rt, relay, server, cfg)
    rt.extra_heartbeat = lambda: {"relay": relay.advertise, "node": relay.node, "versions": server.versions}
    try:
        rt.install_signal_handlers()
        report.round()
        rt.start_admin(report.status)
        report.run_reporter(rt.stop_event)
        log.info("relay %s (pid %d) serving on %s for node %s; upstream %s", worker, os.getpid(), relay.advertise,
                 relay.node, cfg.relay.upstream or "the learner's announced address")
        relay.run(rt.stop_event, on_round=report.round)  # registers at once; Redis away at start is retried
    finally:
        relay.close()
        server.stop()
        rt.close()
    return 0
