"""Keeping a worker's weights current: rollout workers and teacher scorers call `sync()`
between batches. The announced version on Redis is cheap to read; only a newer version
(or one a task requires) is pulled over gRPC and loaded.

The announcement also says where the learner's weight server listens (it binds its own
port, so two runs on one machine never race for one); unless `transport.weights_target`
pins an address (a cluster Service name), clients dial the announced one and follow it when
a restarted learner listens elsewhere. Waits have deadlines and say what they wait for.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import torch

from rlrt_core.config import RunConfig

log = logging.getLogger(__name__)

Loader = Callable[[Iterable[tuple[str, torch.Tensor]], int], None]


class VersionWaitTimeout(TimeoutError):
    """No weight version >= the one needed was announced within the deadline."""


class WeightSync:
    def __init__(self, cfg: RunConfig, redis_client, load: Loader, *, version: int = 0,
                 on_loaded: Callable[[int, float], None] | None = None,
                 on_wait: Callable[[str | None], None] | None = None) -> None:
        self.cfg = cfg
        self.redis = redis_client
        self.load = load
        self.version = version
        self.on_loaded = on_loaded
        self.on_wait = on_wait or (lambda _what: None)
        self._client = None
        self._target: str | None = None

    def announcement(self):
        """The run's latest announcement (version, address), or None before the first."""
        from rlrt_core.weights.announce import read_announcement

        return read_announcement(self.redis, self.cfg.run_name, prefix=self.cfg.transport.stream_prefix)

    def announced(self) -> int:
        a = self.announcement()
        return -1 if a is None else int(a.version)

    def _client_for(self, address: str):
        from rlrt_core.weights.client import WeightClient

        t = self.cfg.transport
        target = t.weights_target or address or None
        if self._client is None or target != self._target:
            if self._client is not None:
                self._client.close()
            self._client = WeightClient.from_config(t, target=target)
            self._target = target
        return self._client

    def sync(self, min_version: int = -1, *, wait: bool = False, stop: Callable[[], bool] = lambda: False,
             poll_s: float = 0.2, timeout_s: float | None = None) -> int:
        """Load the newest announced version if it differs from ours. With `wait`, block
        (polling) until at least `min_version` is loaded, `stop()` says so, or `timeout_s`
        (default `rollout.version_wait_s`) passes: then `VersionWaitTimeout`."""
        deadline = time.monotonic() + (self.cfg.rollout.version_wait_s if timeout_s is None else timeout_s)
        try:
            while True:
                a = self.announcement()
                # Normally newer; a lower announced version means the run was restarted from
                # scratch and our weights belong to a policy that no longer exists.
                if a is not None and a.version >= 0 and a.version != self.version:
                    self.on_wait(f"weight version {a.version} from the weight server")
                    t0 = time.perf_counter()
                    got = self._pull(a.version, a.address)
                    if self.on_loaded is not None:
                        self.on_loaded(got, time.perf_counter() - t0)
                if self.version >= min_version or not wait or stop():
                    return self.version
                latest = "none yet" if a is None else str(a.version)
                self.on_wait(f"weight version >= {min_version} to be announced (latest {latest})")
                if time.monotonic() > deadline:
                    raise VersionWaitTimeout(f"no weight version >= {min_version} announced for run "
                                             f"{self.cfg.run_name!r} (latest {latest}); gave up waiting")
                time.sleep(poll_s)
        finally:
            self.on_wait(None)

    def _pull(self, version: int, address: str = "") -> int:
        stream = self._client_for(address).stream(version)
        got = stream.version  # the latest, when the announced one is no longer kept
        self.load(stream, got)
        self.version = got
        log.info("loaded weight version %d", got)
        return got

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
