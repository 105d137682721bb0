"""Keeping a worker's weights current: rollout workers and teacher scorers call `sync()`
between batches. The announced version on Redis is cheap to read; only a newer version
(or one a task requires) is pulled over gRPC and loaded.

The announcement also says where the learner's weight server listens (it binds its own
port, so two runs on one machine never race for one); unless `transport.weights_target`
pins an address (a cluster Service name), clients dial the announced one and follow it when
a restarted learner listens elsewhere. Waits have deadlines and say what they wait for.

With `transport.weights_delta` (the default) the sync keeps the bytes of the version it
loaded (`HeldVersion`: one full version in host memory, in the published dtype; e.g. 16 GB
for an 8B model in bf16) and asks for the next version as a delta from it; the rebuilt
version's sha256 is checked before the engine sees it, and anything wrong (base no longer
kept, checksum mismatch, corrupt chunk) ends in a full pull. Engine tensors are not used as
the base: vLLM repacks its weights, and an engine may hold another dtype than the one
published. Pulls are counted by kind (`rlrt_{rollout,teacher}_weight_pulls_total`) with the
bytes received, when `metrics` is given.

With `transport.weights_relay: auto` a version is pulled from a weight relay
(`rlrt_core.weights.relay`): the live relays in Redis, own node first; a relay that is gone,
fails mid-pull, or does not hold the version within `transport.weights_relay_wait_s` is
passed over (`rlrt_{rollout,teacher}_weight_source_fallbacks_total`) for the next one, and
the learner is the last source, so the worker always ends with the announced version,
sha256-verified like any pull.

With `transport.weights_backend: collective` the learner also broadcasts every version to
the workers through a torch.distributed group (`rlrt_core.weights.collective`; the receiver
runs on a thread here, or inside vLLM's workers, joined through the sender's address on
Redis). `sync()` then waits up to `transport.weights_collective_timeout_s` for the announced
version to be staged by the receiver, checks its sha256 against the checksum the weight
server reports for that version (the gRPC control plane), and loads it. Whatever goes wrong
(no sender, not in a group yet, timeout, failed broadcast, checksum, no answer from the weight
server, engine refusal) ends in
the gRPC pull above, counted in `rlrt_{rollout,teacher}_weight_collective_fallbacks_total`
by reason; versions loaded from the collective are counted in
`..._weight_collective_versions_total`. A collective load drops the held delta base (the
bytes live in the receiver, or in vLLM's workers), so the next gRPC pull is a full one.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable, Iterable

import torch

from rlrt_core import heap
from rlrt_core.config import RunConfig

log = logging.getLogger(__name__)

Loader = Callable[[Iterable[tuple[str, torch.Tensor]], int], None]


class VersionWaitTimeout(TimeoutError):
    """No weight version >= the one needed was announced within the deadline."""


class _Behind(Exception):
    """A source served an older version than the one asked for (a relay that lost it)."""


class WeightSync:
    def __init__(self, cfg: RunConfig, redis_client, load: Loader, *, version: int = 0,
                 on_loaded: Callable[[int, float], None] | None = None,
                 on_wait: Callable[[str | None], None] | None = None, metrics: Any = None,
                 worker: str | None = None, collective: Any = None) -> None:
        self.cfg = cfg
        self.redis = redis_client
        self.load = load
        self.version = version
        self.on_loaded = on_loaded
        self.on_wait = on_wait or (lambda _what: None)
        self._clients: dict[str, Any] = {}  # target -> WeightClient
        self.metrics = metrics  # RolloutMetrics / TeacherMetrics: weight_pulls, weight_received_bytes
        self.held = None  # HeldVersion of `version` when deltas are on
        # The worker id spreads workers over relays (rendezvous hash).
        self.worker = worker or getattr(metrics, "worker", None) or f"{socket.gethostname()}-{os.getpid()}"
        self._learner: str | None = None
        self._sources = None
        # The member side of the collective data plane: the engine's link (vLLM's runs inside
        # its workers), else a receiver on a thread here loading through `load`.
        self._link = None
        if cfg.transport.weights_backend == "collective":
            from rlrt_core.weights.collective import LocalCollectiveLink

            self._link = collective if collective is not None else LocalCollectiveLink(load)
        if cfg.transport.weights_relay == "auto":
            from rlrt_core.weights.relay import RelaySources, node_name

            t = cfg.transport
            self._sources = RelaySources(redis_client, cfg.run_name, worker_id=self.worker,
                                         node=node_name(t.weights_node), prefix=t.stream_prefix,
                                         wait_s=t.weights_relay_wait_s, on_fallback=self._count_fallback)

    def announcement(self):
        """The run's latest announcement (version, address), or None before the first."""
        from rlrt_core.weights.announce import read_announcement

        return read_announcement(self.redis, self.cfg.run_name, prefix=self.cfg.transport.stream_prefix)

    def announced(self) -> int:
        a = self.announcement()
        return -1 if a is None else int(a.version)

    def _learner_target(self, address: str) -> str | None:
        target = self.cfg.transport.weights_target or address or None
        if target != self._learner:  # a restarted learner listens elsewhere: forget the old one
            self._drop_client(self._learner)
            self._learner = target
        return target

    def _client_for(self, target: str | None):
        from rlrt_core.weights.client import WeightClient

        key = target or ""
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = WeightClient.from_config(self.cfg.transport, target=target)
        return client

    def _drop_client(self, target: str | None) -> None:
        client = self._clients.pop(target or "", None)
        if client is not None:
            client.close()

    def _count_fallback(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.weight_source_fallbacks.labels(reason=reason).inc()

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
                    got = self._via_collective(a.version, a.address) if self._link is not None else None
                    if got is None:
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

    def _collective_fallback(self, reason: str, detail: str = "") -> None:
        log.info("weight version over gRPC, not the collective: %s%s", reason, f" ({detail})" if detail else "")
        if self.metrics is not None:
            self.metrics.weight_collective_fallbacks.labels(reason=reason).inc()

    def _via_collective(self, version: int, address: str) -> int | None:
        """Load `version` (or a newer one) from the collective receiver; None (counted) when
        it does not come or does not verify: the caller pulls over gRPC."""
        from rlrt_core.weights.collective import read_sender

        t = self.cfg.transport
        info = read_sender(self.redis, self.cfg.run_name, prefix=t.stream_prefix)
        if info is None:
            self._collective_fallback("no_sender")
            return None
        try:
            self._link.connect(info, t.weights_collective_timeout_s)
        except Exception as err:  # noqa: BLE001 - e.g. an NCCL sender and no CUDA here
            self._collective_fallback("not_member", str(err))
            return None
        staged, why = self._link.wait(version, t.weights_collective_timeout_s)
        if staged is None:
            self._collective_fallback(why)
            return None
        # The control plane's word on these bytes: the checksum the weight server gives for
        # that version (authenticated gRPC), not only the broadcast header's.
        try:
            served = self._client_for(self._learner_target(address)).version_info(staged.version)
        except Exception as err:  # noqa: BLE001
            self._collective_fallback("unverified", f"cannot ask the weight server: {err}")
            return None
        if served.version != staged.version or served.checksum != staged.checksum:
            self._collective_fallback("checksum", f"version {staged.version}: the weight server reports "
                                                  f"{served.version} / {served.checksum[:16]}…")
            return None
        try:
            self._link.apply(staged)
        except Exception as err:  # noqa: BLE001 - the engine kept its previous weights
            self._collective_fallback("apply", str(err))
            return None
        self.held = None  # the bytes stay with the receiver: the next gRPC pull is a full one
        self.version = staged.version
        if self.metrics is not None:
            self.metrics.weight_collective_versions.inc()
        log.info("loaded weight version %d from the collective (%d bytes)", staged.version, staged.nbytes)
        return staged.version

    def _pull(self, version: int, address: str = "") -> int:
        learner = self._learner_target(address)
        if self._sources is None:
            return self._pull_from(learner, version, "learner", accept_older=True)
        from rlrt_core.weights.client import WeightServiceError

        for src in self._sources.candidates(version, learner or ""):
            if src.kind == "learner":
                # The last source: a substituted (newer) version is fine, as without relays.
                return self._pull_from(learner, version, "learner", accept_older=True)
            try:
                return self._pull_from(src.target, version, "relay", accept_older=False)
            except WeightServiceError as err:
                self._drop_client(src.target)
                self._sources.fallback(src, "unavailable", str(err))
            except _Behind as err:
                self._sources.fallback(src, "behind", str(err))
        raise AssertionError("unreachable: the learner is always the last source")

    def _pull_from(self, target: str | None, version: int, source: str, *, accept_older: bool) -> int:
        """Pull `version` from `target`, load it, count it; `_Behind` (nothing loaded) when
        the source sent an older version and `accept_older` is False."""
        client = self._client_for(target)
        if not self.cfg.transport.weights_delta:
            stream = client.stream(version)
            got = stream.version  # the latest, when the announced one is no longer kept
            if got < version and not accept_older:
                stream.cancel()
                raise _Behind(f"{client.target} sent version {got}, not {version}")
            self.load(stream, got)
            kind, received, why = "full", stream.bytes_received, ""
        else:
            # The held copy is consumed by the pull (rebuilt in place): if anything below
            # fails, nothing half-rebuilt stays behind and the next pull is a full one --
            # unless the call failed before touching it.
            held, self.held = self.held, None
            try:
                pulled = client.pull(version, held=held)
            except Exception as err:
                if getattr(err, "held_intact", False):
                    self.held = held
                raise
            got = pulled.version
            if got < version and not accept_older:
                self.held = pulled.held  # verified, just older: a base for the next source
                raise _Behind(f"{client.target} sent version {got}, not {version}")
            self.load(pulled.held.items(), got)  # verified before the engine sees it
            self.held = pulled.held
            kind, received, why = pulled.kind, pulled.bytes_received, pulled.reason
        if self.metrics is not None:
            self.metrics.weight_pulls.labels(kind=kind).inc()
            self.metrics.weight_received_bytes.inc(received)
            self.metrics.weight_source_pulls.labels(source=source).inc()
        self.version = got
        heap.trim()  # the received version (a full model's bytes) was freed once loaded
        log.info("loaded weight version %d from %s %s (%s, %d bytes received%s)", got, source, client.target, kind,
                 received, f": {why}" if why else "")
        return got

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
        for client in self._clients.values():
            client.close()
        self._clients.clear()
