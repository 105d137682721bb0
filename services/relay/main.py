"""Weight relay service: a thin adapter around `rlrt_core.weights.relay.WeightRelay` that wires
it to Redis (announcements, the relay registry) and to a `WeightServer` built from the run's
transport settings (token, TLS, keep_versions, chunk size, delta encoding), bound on
`relay.host:relay.port` (0 = a free port; a taken fixed port is retried, then reported).

Its upstream is the address the learner announces (or `relay.upstream`); its clients find
it in the registry (`transport.weights_relay: auto`). Stopping it (SIGTERM) removes its
record; a killed relay's record expires after `relay.ttl_s`.
"""

from __future__ import annotations

import logging
import os
import signal
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


def start_relay_server(cfg: RunConfig, *, attempts: int = 20, delay_s: float = 0.5):
    """A started WeightServer on relay.host:relay.port with the run's token and TLS."""
    from rlrt_core.weights.server import WeightServer

    last: Exception | None = None
    for _ in range(attempts if cfg.relay.port else 1):
        server = WeightServer.from_config(cfg.transport, host=cfg.relay.host, port=cfg.relay.port)
        try:
            server.start()
            return server
        except RuntimeError as err:
            last = err
            time.sleep(delay_s)
    raise RuntimeError(f"relay.port {cfg.relay.port} on {cfg.relay.host} stays in use ({last}); free it or set "
                       "relay.port: 0 to let the relay pick one")


def run(cfg: RunConfig, worker: str) -> int:
    from rlrt_core.transport.streams import StreamBus
    from rlrt_core.weights.client import WeightClient
    from rlrt_core.weights.relay import WeightRelay, node_name
    from services.common.runtime import setup_logging

    setup_logging(worker)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("received signal %d: stopping", signum)
        stop.set()

    t = cfg.transport
    try:
        server = start_relay_server(cfg)
    except (RuntimeError, ValueError, OSError) as err:  # port in use, no token, unreadable TLS files
        log.error("%s", err)
        return 2
    try:
        bus = StreamBus.from_config(t, cfg.run_name)
    except ValueError as err:  # no transport.redis_url: the relay has no embedded Redis of its own
        log.error("%s", err)
        server.stop()
        return 2
    relay = WeightRelay(server, bus.client, cfg.run_name,
                        make_client=lambda target: WeightClient.from_config(t, target=target),
                        relay_id=worker, advertise=_advertised(cfg, server.port), node=node_name(t.weights_node),
                        prefix=t.stream_prefix, upstream=cfg.relay.upstream, ttl_s=cfg.relay.ttl_s,
                        heartbeat_s=cfg.relay.heartbeat_s, poll_s=cfg.relay.poll_s)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("relay %s (pid %d) serving on %s for node %s; upstream %s", worker, os.getpid(), relay.advertise,
             relay.node, cfg.relay.upstream or "the learner's announced address")
    try:
        relay.run(stop)  # registers at once; Redis away at start is retried like later
    finally:
        relay.close()
        server.stop()
    return 0
