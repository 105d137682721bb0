"""Keeping a worker's weights current: rollout workers and teacher scorers call `sync()`
between batches. The announced version on Redis is cheap to read; only a newer version
(or one a task requires) is pulled over gRPC and loaded."""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import torch

from rlrt_core.config import RunConfig

log = logging.getLogger(__name__)

Loader = Callable[[Iterable[tuple[str, torch.Tensor]], int], None]


class WeightSync:
    def __init__(self, cfg: RunConfig, redis_client, load: Loader, *, version: int = 0,
                 on_loaded: Callable[[int, float], None] | None = None) -> None:
        from rlrt_core.weights.client import WeightClient

        t = cfg.transport
        self.cfg = cfg
        self.redis = redis_client
        self.client = WeightClient.from_config(t)
        self.load = load
        self.version = version
        self.on_loaded = on_loaded

    def announced(self) -> int:
        from rlrt_core.weights.announce import read_announced_version

        v = read_announced_version(self.redis, self.cfg.run_name, prefix=self.cfg.transport.stream_prefix)
        return -1 if v is None else int(v)

    def sync(self, min_version: int = -1, *, wait: bool = False, stop: Callable[[], bool] = lambda: False,
             poll_s: float = 0.2) -> int:
        """Load the newest announced version if it is newer than ours. With `wait`, block
        (polling) until at least `min_version` is available or `stop()` says so."""
        while True:
            latest = self.announced()
            # Normally newer; a lower announced version means the run was restarted from
            # scratch and our weights belong to a policy that no longer exists.
            if latest >= 0 and latest != self.version:
                t0 = time.perf_counter()
                got = self._pull(latest)
                if self.on_loaded is not None:
                    self.on_loaded(got, time.perf_counter() - t0)
            if self.version >= min_version or not wait or stop():
                return self.version
            time.sleep(poll_s)

    def _pull(self, version: int) -> int:
        stream = self.client.stream(version)
        got = stream.version  # the latest, when the announced one is no longer kept
        self.load(stream, got)
        self.version = got
        log.info("loaded weight version %d", got)
        return got

    def close(self) -> None:
        self.client.close()
