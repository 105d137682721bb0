"""What every service process shares: config, logging, signals, metrics, admin HTTP, Redis.

A service is a loop of `step()` calls until SIGTERM/SIGINT; in-flight stream entries are
either finished or released (they stay pending and a peer's reclaim picks them up), so a
stopped worker loses nothing.

A background thread refreshes, every `metrics.bus_stats_every_s`, the `rlrt_bus_*` queue
gauges of every stream and the service's own backlog (what /healthz compares progress
with), and writes the service's heartbeat into the run's service table in Redis, which
/readyz and `rlrt status` read to show every service of the run, dead ones included.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry

from rlrt_core.config import RunConfig
from rlrt_core.stages import SERVICES as STAGE_SERVICES
from rlrt_core.stages import stage
from services.common.admin import AdminServer, ServiceState

log = logging.getLogger("rlrt")


def services_key(prefix: str, run: str) -> str:
    """Redis hash of the run's services: worker -> JSON heartbeat (see `ServiceRuntime`)."""
    return f"{prefix}:{run}:services"


def read_services(client: Any, prefix: str, run: str, *, heartbeat_s: float = 5.0) -> list[dict[str, Any]]:
    """Every service that ever registered in this run, with `alive` (heartbeat younger than
    3 periods and not stopped) and `last_seen_s` (seconds since its last heartbeat)."""
    now = time.time()
    out = []
    for worker, raw in (client.hgetall(services_key(prefix, run)) or {}).items():
        try:
            rec = json.loads(raw)
        except (TypeError, ValueError):
            continue
        age = now - float(rec.get("last_seen", 0.0))
        rec["last_seen_s"] = round(age, 1)
        rec["alive"] = rec.get("state") != "stopped" and age < 3 * heartbeat_s
        out.append(rec)
    return sorted(out, key=lambda r: (r.get("service", ""), r.get("worker", "")))


def _weight_service_error() -> tuple[type, ...]:
    """The weight client's error type, when that client is loaded (it loads torch, which a
    service that pulls no weights, e.g. the verifier, must not import to classify an error)."""
    client = sys.modules.get("rlrt_core.weights.client")
    return (client.WeightServiceError,) if client is not None else ()


def error_kind(err: BaseException) -> str:
    """Short label of an error for `rlrt_errors_total{kind}`."""
    import redis

    if isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
        return "redis"
    if isinstance(err, _weight_service_error()):
        return "weights"
    if isinstance(err, TimeoutError):
        return "timeout"
    return "internal"


def default_worker_id(service: str) -> str:
    return f"{service}-{socket.gethostname()}-{os.getpid()}"


def is_transient(err: BaseException) -> bool:
    """Infrastructure failures (Redis or the weight server briefly unreachable): the batch
    is retried without charging its entries a delivery."""
    import redis

    return isinstance(err, (redis.ConnectionError, redis.TimeoutError, _weight_service_error(), ConnectionError))


def setup_logging(worker: str) -> None:
    level = os.environ.get("RLRT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s [{worker}] %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class ServiceRuntime:
    """Holds the pieces a service needs and runs its loop until asked to stop."""

    def __init__(self, service: str, cfg: RunConfig, worker: str) -> None:
        from rlrt_core.metrics import service_metrics

        setup_logging(worker)
        self.service = service
        self.cfg = cfg
        self.worker = worker
        self.run = cfg.run_name
        self.stop_event = threading.Event()
        self.registry = CollectorRegistry()
        self.metrics = service_metrics(service, self.run, worker, registry=self.registry)
        self.state = ServiceState(service=service, run=self.run, worker=worker, registry=self.registry,
                                  admin_token=cfg.metrics.admin_token, stall_timeout_s=cfg.metrics.stall_timeout_s,
                                  heartbeat_timeout_s=max(300.0, cfg.metrics.stall_timeout_s))
        self.state.services = self.services
        self.admin = AdminServer(self.state, host=cfg.metrics.http_host, port=cfg.metrics.http_port)
        # The relay runs no stage: it has no input stream, backlog or queue gauges.
        self.stage = stage(service) if service in STAGE_SERVICES else None
        self._bus = None
        self._registration: Path | None = None
        self._admin_port: int | None = None
        self._refresher: threading.Thread | None = None
        self._refresh_stop = threading.Event()
        self.extra_heartbeat: Callable[[], dict[str, Any]] = lambda: {}

    # -- lazily created connections ------------------------------------------------------
    @property
    def bus(self):  # rlrt_core.transport.streams.StreamBus
        if self._bus is None:
            from rlrt_core.transport.streams import StreamBus

            bus = StreamBus.from_config(self.cfg.transport, self.run)
            m = self.metrics
            if self.stage is not None:
                bus.on_claim = lambda stream, n: m.claimed.labels(stream=stream).inc(n)
                bus.on_dead_letter = lambda _stream, kind: m.dead_lettered.labels(reason=kind).inc()
            self._bus = bus
        return self._bus

    @property
    def redis(self):  # redis.Redis (bytes responses), shared with the bus
        return self.bus.client

    # -- lifecycle ---------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def _stop(signum: int, _frame: object) -> None:
            log.info("received signal %d: finishing the current batch, then stopping", signum)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)

    def start_admin(self, status: Callable[[], dict[str, Any]],
                    actions: dict[str, tuple[Any, Callable[[Any], dict[str, Any]]]] | None = None,
                    routers: list[Any] | None = None) -> int:
        """Start the admin app; `routers`: extra read-only FastAPI routers it mounts."""
        self.state.status = status
        if actions:
            self.state.actions.update(actions)
        self.state.routers.extend(routers or [])
        port = self.admin.start()
        self._admin_port = port
        self._register(port)
        log.info("admin HTTP on %s:%d (/healthz /readyz /status /metrics)", self.cfg.metrics.http_host, port)
        self._start_refresher()
        return port

    # -- progress, queues and heartbeats -------------------------------------------------
    def progressed(self) -> None:
        """Call when a unit of work was finished (an entry acked, a step trained)."""
        self.state.progressed()

    def wait_for(self, what: str | None) -> None:
        """Report what the service blocks on (shown by /healthz and /status; None = nothing)."""
        self.state.wait_for(what)

    def services(self) -> list[dict[str, Any]]:
        """Every service of the run seen in Redis (heartbeats), dead ones included."""
        t = self.cfg.transport
        return read_services(self.redis, t.stream_prefix, self.run, heartbeat_s=self.cfg.metrics.heartbeat_s)

    def _heartbeat(self, state: str = "running") -> None:
        host = self.cfg.metrics.http_host
        rec = {"service": self.service, "worker": self.worker, "pid": os.getpid(), "host": socket.gethostname(),
               "admin": f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self._admin_port}",
               "state": state, "ready": self.state.ready, "last_seen": time.time(),
               "last_progress": self.state.last_progress, "waiting_for": self.state.waiting_for}
        try:
            rec.update(self.extra_heartbeat())
        except Exception:  # a status callback must not stop heartbeats
            log.debug("extra heartbeat fields failed", exc_info=True)
        key = services_key(self.cfg.transport.stream_prefix, self.run)
        self.redis.hset(key, self.worker, json.dumps(rec))

    def refresh(self) -> None:
        """One round of the background refresher: queue gauges, own backlog, heartbeat."""
        if self.stage is None:
            self._heartbeat()
            return
        stats = self.bus.stats()
        self.metrics.observe_bus_stats(stats)
        g = (stats.get(self.stage.input) or {}).get("groups", {}).get(self.stage.group)
        self.state.backlog = int(g["pending"]) + int(g["lag"]) if g else int(stats[self.stage.input]["length"])
        self._heartbeat()

    def _start_refresher(self) -> None:
        every = self.cfg.metrics.bus_stats_every_s

        def run() -> None:
            while not self._refresh_stop.is_set():
                try:
                    # A separate connection: the main loop's may be blocked in XREADGROUP.
                    self.refresh()
                except Exception as err:  # Redis away: count it, say so, keep trying
                    self.metrics.errors.labels(kind=error_kind(err)).inc()
                    log.debug("refresh failed: %r", err)
                self._refresh_stop.wait(every)

        self._refresher = threading.Thread(target=run, name=f"refresh-{self.service}", daemon=True)
        self._refresher.start()

    def _register(self, port: int) -> None:
        d = Path(self.cfg.metrics.run_dir) / "services"
        try:
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"{self.worker}.json"
            tmp = path.with_suffix(".tmp")
            host = self.cfg.metrics.http_host
            tmp.write_text(json.dumps({"service": self.service, "worker": self.worker, "pid": os.getpid(),
                                       "host": "127.0.0.1" if host in ("0.0.0.0", "::") else host,
                                       "admin_port": port, "started_at": time.time()}))
            os.replace(tmp, path)
            self._registration = path
        except OSError as err:  # a read-only run dir must not stop a service
            log.warning("could not write service registration in %s: %s", d, err)

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.state.readiness = (ready, reason or ("ready" if ready else "not ready"))

    def loop(self, step: Callable[[], bool], *, idle_sleep_s: float = 0.05,
             on_error: Callable[[BaseException], None] | None = None) -> None:
        """Call `step()` until stopped; `step` returns True when it did work. Transient
        errors (Redis restarting, a bad batch) are logged and retried with backoff."""
        backoff = 0.5
        while not self.stop_event.is_set():
            self.state.beat()
            try:
                did = step()
                backoff = 0.5
            except Exception as err:  # keep the service alive; the error is counted and logged
                self.metrics.errors.labels(kind=error_kind(err)).inc()
                if on_error is not None:
                    try:
                        on_error(err)
                    except Exception:  # e.g. Redis still down: the next round retries
                        log.warning("error handler failed", exc_info=True)
                log.exception("error in %s loop (retrying in %.1fs)", self.service, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 15.0)
                continue
            if not did:
                self.stop_event.wait(idle_sleep_s)

    def retry_pending(self) -> Callable[[BaseException], None]:
        """`loop(on_error=...)` handler: a failed batch leaves its entries pending for this
        worker on its stage's input; re-read them next round (a delivery only when the entry
        may be at fault)."""
        def handler(err: BaseException) -> None:
            self.bus.redeliver_pending(self.stage.input, self.stage.group, self.worker,
                                       count_delivery=not is_transient(err))
        return handler

    def close(self) -> None:
        self.set_ready(False, "stopping")
        self._refresh_stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        if self._bus is not None:
            try:
                self._heartbeat("stopped")
            except Exception:
                log.debug("could not record the stop in Redis", exc_info=True)
        self.admin.stop()
        if self._registration is not None:
            self._registration.unlink(missing_ok=True)
        if self._bus is not None:
            try:
                self._bus.client.close()
            except Exception:
                log.debug("redis close failed", exc_info=True)
