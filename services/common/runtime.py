"""What every service process shares: config, logging, signals, metrics, admin HTTP, Redis.

A service is a loop of `step()` calls until SIGTERM/SIGINT; in-flight stream entries are
either finished or released (they stay pending and a peer's reclaim picks them up), so a
stopped worker loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry

from rlrt_core.config import RunConfig
from services.common.admin import AdminServer, ServiceState

log = logging.getLogger("rlrt")


def default_worker_id(service: str) -> str:
    return f"{service}-{socket.gethostname()}-{os.getpid()}"


def is_transient(err: BaseException) -> bool:
    """Infrastructure failures (Redis or the weight server briefly unreachable): the batch
    is retried without charging its entries a delivery."""
    import redis

    from rlrt_core.weights.client import WeightServiceError

    return isinstance(err, (redis.ConnectionError, redis.TimeoutError, WeightServiceError, ConnectionError))


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
                                  admin_token=cfg.metrics.admin_token)
        self.admin = AdminServer(self.state, host=cfg.metrics.http_host, port=cfg.metrics.http_port)
        self._bus = None
        self._registration: Path | None = None

    # -- lazily created connections ------------------------------------------------------
    @property
    def bus(self):  # rlrt_core.transport.streams.StreamBus
        if self._bus is None:
            from rlrt_core.transport.streams import StreamBus

            self._bus = StreamBus.from_config(self.cfg.transport, self.run)
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
                    actions: dict[str, tuple[Any, Callable[[Any], dict[str, Any]]]] | None = None) -> int:
        self.state.status = status
        if actions:
            self.state.actions.update(actions)
        port = self.admin.start()
        self._register(port)
        log.info("admin HTTP on %s:%d (/healthz /readyz /status /metrics)", self.cfg.metrics.http_host, port)
        return port

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
        self.state.ready = ready
        self.state.ready_reason = reason or ("ready" if ready else "not ready")

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
                if on_error is not None:
                    on_error(err)
                log.exception("error in %s loop (retrying in %.1fs)", self.service, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 15.0)
                continue
            if not did:
                self.stop_event.wait(idle_sleep_s)

    def retry_pending(self, stream: str, group: str) -> Callable[[BaseException], None]:
        """`loop(on_error=...)` handler: a failed batch leaves its entries pending for this
        worker; re-read them next round (a delivery only when the entry may be at fault)."""
        def handler(err: BaseException) -> None:
            self.bus.redeliver_pending(stream, group, self.worker, count_delivery=not is_transient(err))
        return handler

    def close(self) -> None:
        self.set_ready(False, "stopping")
        self.admin.stop()
        if self._registration is not None:
            self._registration.unlink(missing_ok=True)
        if self._bus is not None:
            try:
                self._bus.client.close()
            except Exception:
                log.debug("redis close failed", exc_info=True)
