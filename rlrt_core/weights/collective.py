"""The collective weight data plane (`transport.weights_backend: collective`): learner rank 0
broadcasts each published version to the rollout workers and teacher scorers through a
torch.distributed process group (NCCL on GPUs, gloo on CPU: the same code), the way TRL and
prime-rl feed vLLM. gRPC stays the control plane and the fallback data path: a member loads a
broadcast version only after its sha256 matched the checksum the weight server gives for that
version; anything wrong ends in the ordinary gRPC pull (`services.common.weight_sync`).

Rendezvous. The sender (`CollectiveSender`, in the learner) hosts a torch `TCPStore` (it binds
port 0 itself) and announces `host:port` and the backend on Redis
(`{prefix}:{run}:weights:collective`, `announce_sender` / `read_sender`). No default process
group is created, so this coexists with the learner's own multi-rank group.

Membership, in epochs (store keys):
  members            counter; a receiver takes its member id with add(1)
  m/<id>/hb          counter the receiver bumps every `heartbeat_s` (the sender watches it move:
                     no clock is compared across machines)
  m/<id>/left        set by a receiver that closes
  epoch              the current epoch number e
  e/<e>/members      JSON list of member ids: rank 1 + index in this list; rank 0 is the sender
  e/<e>/ack/<id>     a member's "I am joining e"; e/<e>/go once every listed member acked
  e/<e>/msg/<n>      header of the n-th broadcast of epoch e (JSON, see below)
  e/<e>/broken       set by the sender when a broadcast of e failed: members leave e
  latest             {"version", "members"}: the last version the sender handled and who it
                     went to (a worker outside that list knows at once not to wait for it)
  e/<e>/pg/...       the process group's own rendezvous (a PrefixStore)
Before each broadcast the sender re-forms the group (epoch + 1) when the live members differ
from the group's. A member whose heartbeat stopped for `timeout_s` is dropped; one that does
not ack within `timeout_s` is left out until its heartbeat moves again. A broadcast that fails
or times out marks its epoch broken; the next version forms a new one.

Wire format (PROTOCOL 1). One version is one flat uint8 buffer: the weight server's version
buffer as it is, i.e. safetensors (8-byte little-endian header length, JSON header with every
tensor's dtype, shape and data_offsets in the server's order, the tensors' bytes), sent in
`chunk_bytes` broadcasts. The header in the store: {"protocol", "version", "nbytes",
"chunk_bytes", "sha256"} with the server's version checksum (`VersionHasher`: per tensor its
name, dtype, shape, byte length, then bytes). The receiver hashes what it got the same way; a
mismatch is reported as a failure of that version ("checksum").

The sender runs on a background thread: `offer()` returns at once and only the newest offered
version is sent (a worker that misses one loads the next, or pulls it over gRPC).

Security: the TCPStore and the process group are not authenticated (as with NCCL in TRL and
prime-rl): keep them on a private network. A member loads nothing whose checksum differs
from the one the token-guarded gRPC server reports.
"""

from __future__ import annotations

import datetime
import json
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from rlrt_core.transport.codec import DTYPE_TO_TORCH, VersionHasher

log = logging.getLogger(__name__)

PROTOCOL = 1
CHUNK_BYTES = 64 << 20
BACKENDS = ("gloo", "nccl")


# -- the announcement on Redis ---------------------------------------------------------------

def sender_key(run: str, prefix: str = "rlrt") -> str:
    return f"{prefix}:{run}:weights:collective"


@dataclass(frozen=True)
class SenderInfo:
    address: str   # host:port of the sender's TCPStore
    backend: str   # "gloo" | "nccl"
    protocol: int


def announce_sender(client: Any, run: str, *, address: str, backend: str, prefix: str = "rlrt") -> None:
    """Record where the run's collective sender listens (overwrites a previous learner's)."""
    client.set(sender_key(run, prefix), json.dumps({"address": address, "backend": backend, "protocol": PROTOCOL}))


def read_sender(client: Any, run: str, *, prefix: str = "rlrt") -> SenderInfo | None:
    raw = client.get(sender_key(run, prefix))
    if raw is None:
        return None
    d = json.loads(raw)
    return SenderInfo(address=str(d["address"]), backend=str(d["backend"]), protocol=int(d.get("protocol", 1)))


# -- the version buffer --------------------------------------------------------------------------

def safetensors_layout(buf: bytes | bytearray | memoryview) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """(name, dtype, shape, start, end) of every tensor of a safetensors-format buffer, in the
    order of its header (absolute byte offsets into `buf`). Raises ValueError when malformed."""
    if len(buf) < 8:
        raise ValueError("weights buffer shorter than its header length")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if 8 + n > len(buf):
        raise ValueError(f"weights buffer header of {n} bytes overruns the {len(buf)}-byte buffer")
    header = json.loads(bytes(buf[8:8 + n]))
    base = 8 + n
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = (int(x) for x in meta["data_offsets"])
        if meta["dtype"] not in DTYPE_TO_TORCH or not 0 <= start <= end or base + end > len(buf):
            raise ValueError(f"weights buffer: bad entry for tensor {name!r}")
        out.append((name, meta["dtype"], tuple(int(s) for s in meta["shape"]), base + start, base + end))
    return out


def buffer_checksum(buf: bytes | bytearray | memoryview) -> str:
    """The version checksum (as `WeightServer` computes it) of a safetensors-format buffer."""
    hasher = VersionHasher()
    view = memoryview(buf)
    for name, dtype, shape, start, end in safetensors_layout(buf):
        hasher.begin_tensor(name, dtype, shape, end - start)
        hasher.update(view[start:end])
    return hasher.hexdigest()


@dataclass
class StagedVersion:
    """A version received and verified by a `CollectiveReceiver`: its safetensors-format bytes
    (`buffer`, host memory) and checksum."""

    version: int
    checksum: str
    buffer: bytearray

    @property
    def nbytes(self) -> int:
        return len(self.buffer)

    def layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(n, d, s) for n, d, s, _a, _b in safetensors_layout(self.buffer)]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs viewing the buffer (no copy; engines copy into their own weights)."""
        for name, dtype, shape, start, end in safetensors_layout(self.buffer):
            if end == start:
                yield name, torch.empty(shape, dtype=DTYPE_TO_TORCH[dtype])
                continue
            t = torch.frombuffer(self.buffer, dtype=torch.uint8, count=end - start, offset=start)
            yield name, t.view(DTYPE_TO_TORCH[dtype]).view(shape)


# -- process groups ------------------------------------------------------------------------------

def _timedelta(s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(s))


def resolve_backend(backend: str) -> str:
    """"auto" -> "nccl" when this process sees a CUDA device, else "gloo"."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"collective backend must be auto, gloo or nccl, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("the nccl collective backend needs a CUDA device in this process")
    return backend


def _make_group(backend: str, store: Any, rank: int, size: int, timeout_s: float) -> Any:
    """A process group of its own on `store` (no default group: the learner may have one)."""
    from torch.distributed import ProcessGroupGloo

    if backend == "gloo":
        return ProcessGroupGloo(store, rank, size, _timedelta(timeout_s))
    from torch.distributed import ProcessGroupNCCL

    opts = ProcessGroupNCCL.Options()
    opts._timeout = _timedelta(timeout_s)
    return ProcessGroupNCCL(store, rank, size, opts)


def _broadcast(pg: Any, tensor: torch.Tensor, timeout_s: float) -> None:
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank = 0
    opts.timeout = _timedelta(timeout_s)
    pg.broadcast([tensor], opts).wait()


def _device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    off = 0
    while off < n:
        yield off, min(chunk, n - off)
        off += chunk


# -- sender --------------------------------------------------------------------------------------

@dataclass
class _Job:
    version: int
    buffer: Any                      # bytes-like, valid until release()
    checksum: Callable[[], str]
    release: Callable[[], None]


class CollectiveSender:
    """Rank 0 of the collective data plane (see the module docstring).

    host/port: where the TCPStore binds (port 0 = a free one; `.port` after construction).
    backend: "gloo" or "nccl" (`resolve_backend`). timeout_s: deadline of one chunk's
    broadcast, of the members' acks and of a group's rendezvous; a member whose heartbeat did
    not move for that long is dropped. metrics: `LearnerMetrics` or None.

    Counters (read by tests and the bench): `versions_sent`, `bytes_sent`, `failures`,
    `epoch`, `members` (ids of the current group), `last_seconds`.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, backend: str = "gloo", timeout_s: float = 60.0,
                 chunk_bytes: int = CHUNK_BYTES, metrics: Any = None) -> None:
        from torch.distributed import TCPStore

        self.backend = resolve_backend(backend)
        self.timeout_s = float(timeout_s)
        self.chunk_bytes = int(chunk_bytes)
        self.metrics = metrics
        self.host = host
        self.store = TCPStore(host, int(port), None, True, _timedelta(timeout_s), wait_for_workers=False)
        self.port = int(self.store.port)
        self._cond = threading.Condition()
        self._job: _Job | None = None
        self._closed = False
        self._busy = False
        self.epoch = 0
        self.members: list[int] = []
        self._group: Any = None
        self._seq = 0
        self._seen: dict[int, tuple[int, float]] = {}     # id -> (heartbeat value, when it last moved)
        self._excluded: dict[int, int] = {}               # id -> heartbeat value when left out
        # After a group whose members all acked fails its rendezvous (e.g. a firewall between
        # the ranks), forming is retried only after a doubling pause, so workers are not made
        # to wait for a group that keeps failing: they pull over gRPC meanwhile.
        self._backoff_s = 0.0
        self._backoff_until = 0.0
        self.versions_sent = 0
        self.bytes_sent = 0
        self.failures = 0
        self.last_seconds = 0.0
        self.last_version = -1
        self._thread = threading.Thread(target=self._run, name="collective-sender", daemon=True)
        self._thread.start()
        log.info("collective sender (%s) rendezvous on %s:%d", self.backend, host, self.port)

    def address(self, advertise: str | None = None) -> str:
        return f"{advertise or self.host}:{self.port}"

    # -- offering versions ---------------------------------------------------------------
    def offer(self, version: int, buffer: Any, checksum: str | Callable[[], str],
              release: Callable[[], None] = lambda: None) -> None:
        """Broadcast `version` (a safetensors-format bytes-like `buffer`, kept valid until
        `release()` is called) with its version `checksum` (or a callable that waits for it)
        soon, on the sender's thread. A version offered before an older one was sent replaces it."""
        job = _Job(int(version), buffer, checksum if callable(checksum) else (lambda: checksum), release)
        with self._cond:
            if self._closed:
                job.release()
                return
            old, self._job = self._job, job
            self._cond.notify_all()
        if old is not None:
            old.release()

    def offer_from_server(self, server: Any, version: int) -> None:
        """Offer a version the `WeightServer` keeps (held as a reader until sent)."""
        buf, checksum, release = server.hold(version)
        self.offer(version, buf, checksum, release)

    def idle(self, timeout_s: float = 60.0) -> bool:
        """Wait until nothing is pending or being sent; True when idle."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._job is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            job, self._job = self._job, None
            self._cond.notify_all()
        if job is not None:
            job.release()
        self._thread.join(timeout=self.timeout_s + 5)
        self._group = None

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job, self._job = self._job, None
                self._busy = True
            try:
                self._send(job)
            except Exception:  # noqa: BLE001 - the data plane must never take the learner down
                log.exception("collective broadcast of version %d failed", job.version)
                self._fail()
            finally:
                job.release()
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _hb(self, mid: int) -> int | None:
        key = f"m/{mid}/hb"
        if not self.store.check([key]) or self.store.check([f"m/{mid}/left"]):
            return None
        return int(self.store.add(key, 0))

    def _alive(self) -> list[int]:
        now = time.monotonic()
        alive = []
        for mid in range(1, int(self.store.add("members", 0)) + 1):
            hb = self._hb(mid)
            if hb is None:
                self._seen.pop(mid, None)
                continue
            seen = self._seen.get(mid)
            if seen is None or seen[0] != hb:
                seen = self._seen[mid] = (hb, now)
                if self._excluded.get(mid, hb) != hb:
                    del self._excluded[mid]  # alive again: it may join the next epoch
            if now - seen[1] > self.timeout_s or mid in self._excluded:
                continue
            alive.append(mid)
        return alive

    def _set_members(self, members: list[int]) -> None:
        self.members = members
        if self.metrics is not None:
            self.metrics.collective_members.set(len(members))

    def _form(self, members: list[int]) -> None:
        """A new epoch with `members` (minus those that do not ack in time)."""
        while True:
            self._group = None
            self.epoch += 1
            e, self._seq = self.epoch, 0
            self.store.set(f"e/{e}/members", json.dumps(members))
            self.store.set("epoch", str(e))
            if not members:
                self._set_members([])
                return
            deadline = time.monotonic() + self.timeout_s
            waiting = set(members)
            while waiting and time.monotonic() < deadline:
                waiting = {m for m in waiting if not self.store.check([f"e/{e}/ack/{m}"])}
                if waiting:
                    time.sleep(0.02)
            if waiting:
                log.warning("collective epoch %d: members %s did not join within %.0fs; leaving them out",
                            e, sorted(waiting), self.timeout_s)
                for m in waiting:
                    hb = self._hb(m)
                    if hb is not None:
                        self._excluded[m] = hb
                members = [m for m in members if m not in waiting]
                continue
            self.store.set(f"e/{e}/go", "1")
            from torch.distributed import PrefixStore

            self._group = _make_group(self.backend, PrefixStore(f"e/{e}/pg", self.store), 0, 1 + len(members),
                                      self.timeout_s)
            self._set_members(members)
            log.info("collective epoch %d: %d member(s) %s", e, len(members), members)
            return

    def _fail(self) -> None:
        """Drop the current epoch (its members leave it and fall back to gRPC)."""
        self.failures += 1
        if self.metrics is not None:
            self.metrics.collective_failures.inc()
        try:
            self.store.set(f"e/{self.epoch}/broken", "1")
        except Exception:  # noqa: BLE001
            pass
        self._group = None
        self._set_members([])

    def _latest(self, version: int, members: list[int]) -> None:
        self.store.set("latest", json.dumps({"version": version, "members": members}))

    def _send(self, job: _Job) -> None:
        checksum = job.checksum()  # the server's hash runs on its own thread: usually ready
        members = self._alive()
        if self._group is None or members != self.members:
            if time.monotonic() < self._backoff_until:
                self._latest(job.version, [])
                return
            try:
                self._form(members)
                self._backoff_s = 0.0
            except Exception as err:  # a member that acked and died before the rendezvous, or no route
                self._backoff_s = min(max(2 * self._backoff_s, self.timeout_s), 600.0)
                self._backoff_until = time.monotonic() + self._backoff_s
                log.warning("collective epoch %d did not form (%s); version %d goes over gRPC only, the "
                            "next try in %.0fs", self.epoch, err, job.version, self._backoff_s)
                self._fail()
                self._latest(job.version, [])
                return
        self._latest(job.version, self.members)
        if not self.members:
            return
        e = self.epoch
        data = torch.frombuffer(job.buffer, dtype=torch.uint8)
        n = data.numel()
        self._seq += 1
        msg = f"e/{e}/msg/{self._seq}"
        self.store.set(msg, json.dumps({
            "protocol": PROTOCOL, "version": job.version, "nbytes": n, "chunk_bytes": self.chunk_bytes,
            "sha256": checksum}))
        t0 = time.perf_counter()
        dev = _device(self.backend)
        staging = torch.empty(min(self.chunk_bytes, n), dtype=torch.uint8, device=dev) if dev.type != "cpu" else None
        try:
            for off, size in _chunks(n, self.chunk_bytes):
                piece = data[off:off + size]
                if staging is not None:  # NCCL sends device memory
                    staging[:size].copy_(piece, non_blocking=False)
                    piece = staging[:size]
                _broadcast(self._group, piece, self.timeout_s)
        except Exception as err:  # noqa: BLE001
            log.warning("collective broadcast of version %d in epoch %d failed (%s); the epoch is dropped",
                        job.version, e, str(err).splitlines()[0] if str(err) else type(err).__name__)
            self._fail()
            return
        finally:
            # Every member read the header before taking part (or has left the epoch).
            self.store.delete_key(msg)
        dt = time.perf_counter() - t0
        now = time.monotonic()
        for m in self.members:  # busy receiving, not dead: their heartbeats paused meanwhile
            if m in self._seen:
                self._seen[m] = (self._seen[m][0], now)
        self.versions_sent += 1
        self.bytes_sent += n
        self.last_seconds = dt
        self.last_version = job.version
        if self.metrics is not None:
            self.metrics.collective_sent_bytes.inc(n)
            self.metrics.collective_broadcast_seconds.observe(dt)
        log.info("collective: version %d (%d bytes) to %d member(s) in %.3fs", job.version, n, len(self.members), dt)


# -- receiver ------------------------------------------------------------------------------------

@dataclass
class ReceiverStatus:
    """What a `CollectiveReceiver` knows, as plain data (it crosses vLLM's RPC)."""

    connected: bool = False
    member_id: int = 0
    epoch: int = 0
    member: bool = False                      # in a live epoch of the sender's group
    sender_version: int = -1                  # the last version the sender handled
    included: bool = False                    # ... and whether it went to this member
    staged_version: int = -1                  # verified and waiting to be loaded (-1: none)
    staged_checksum: str = ""
    failed: dict[int, str] = field(default_factory=dict)   # version -> "checksum" | "broken"
    received_versions: int = 0
    received_bytes: int = 0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["failed"] = {str(k): v for k, v in self.failed.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReceiverStatus":
        d = dict(d)
        d["failed"] = {int(k): v for k, v in d.get("failed", {}).items()}
        return cls(**d)


class CollectiveReceiver:
    """A member of the collective data plane: joins the sender at `address` ("host:port") and
    receives every version broadcast to its epoch on a background thread into host memory,
    verifies its sha256 and stages it (`take`). Reconnects (as a new member) when the sender's
    store goes away; `close()` leaves. Memory: up to two versions (one staged, one arriving)."""

    def __init__(self, address: str, *, backend: str = "gloo", timeout_s: float = 60.0, heartbeat_s: float = 1.0,
                 poll_s: float = 0.02) -> None:
        host, _, port = address.rpartition(":")
        # Refuse here what this process cannot join (NCCL without a GPU): a member that acked
        # and then failed the rendezvous would cost every other member the version.
        resolve_backend(backend)
        self.address = address
        self.host, self.port = host.strip("[]"), int(port)
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self.poll_s = float(poll_s)
        self._lock = threading.Condition()
        self._status = ReceiverStatus()
        self._staged: StagedVersion | None = None
        self._closed = threading.Event()
        self._store: Any = None
        self._pg: Any = None
        self._thread = threading.Thread(target=self._run, name="collective-receiver", daemon=True)
        self._thread.start()

    # -- public ---------------------------------------------------------------------------
    def status(self) -> ReceiverStatus:
        with self._lock:
            st = ReceiverStatus(**{**self._status.__dict__, "failed": dict(self._status.failed)})
        return st

    def take(self, min_version: int = -1) -> StagedVersion | None:
        """The staged version if it is >= `min_version` (it is handed over: staged no more)."""
        with self._lock:
            s = self._staged
            if s is None or s.version < min_version:
                return None
            self._staged = None
            self._status.staged_version, self._status.staged_checksum = -1, ""
            return s

    def wait(self, version: int, timeout_s: float) -> tuple[StagedVersion | None, str]:
        """Wait until a version >= `version` is staged (then take it) or it cannot come: (staged,
        "") or (None, why): "not_member" (not in a live epoch), "checksum" / "broken" (this
        version failed), "timeout"."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                s = self._staged
                if s is not None and s.version >= version:
                    self._staged = None
                    self._status.staged_version, self._status.staged_checksum = -1, ""
                    return s, ""
                st = self._status
                if version in st.failed:
                    return None, st.failed[version]
                # Not connected, or the sender handled this version (or a newer one) without us.
                if not st.connected or (st.sender_version >= version and not st.included):
                    return None, "not_member"
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, "timeout"
                self._lock.wait(min(left, 0.1))

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=self.timeout_s + 5)

    # -- the thread -----------------------------------------------------------------------
    def _set(self, **kw: Any) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self._status, k, v)
            self._lock.notify_all()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._session()
            except Exception as err:  # noqa: BLE001 - the sender went away: reconnect as a new member
                self._pg = None
                self._set(connected=False, member=False, error=str(err).splitlines()[0] if str(err) else repr(err))
                log.info("collective receiver: %s; reconnecting", self._status.error)
                self._closed.wait(1.0)
        try:
            if self._store is not None and self._status.member_id:
                self._store.set(f"m/{self._status.member_id}/left", "1")
        except Exception:  # noqa: BLE001
            pass

    def _session(self) -> None:
        from torch.distributed import PrefixStore, TCPStore

        store = self._store = TCPStore(self.host, self.port, None, False, _timedelta(self.timeout_s))
        mid = int(store.add("members", 1))
        hb_key = f"m/{mid}/hb"
        store.add(hb_key, 1)
        self._set(connected=True, member_id=mid, member=False, epoch=0, error="")
        epoch, seq, last_hb = 0, 1, time.monotonic()
        while not self._closed.is_set():
            if time.monotonic() - last_hb >= self.heartbeat_s:
                store.add(hb_key, 1)
                last_hb = time.monotonic()
            if store.check(["latest"]):
                d = json.loads(store.get("latest"))
                if int(d["version"]) != self._status.sender_version or (mid in d["members"]) != self._status.included:
                    self._set(sender_version=int(d["version"]), included=mid in d["members"])
            e = int(store.get("epoch")) if store.check(["epoch"]) else 0
            if e != epoch:
                epoch, seq, self._pg = e, 1, None
                self._set(epoch=e, member=False)
                members = json.loads(store.get(f"e/{e}/members"))
                if mid in members:
                    store.set(f"e/{e}/ack/{mid}", "1")
                    if self._await_go(store, e):
                        try:
                            self._pg = _make_group(self.backend, PrefixStore(f"e/{e}/pg", store),
                                                   1 + members.index(mid), 1 + len(members), self.timeout_s)
                            self._set(member=True)
                        except Exception as err:  # noqa: BLE001
                            log.warning("collective receiver: epoch %d rendezvous failed: %s", e, err)
                continue
            if self._pg is not None:
                if store.check([f"e/{e}/broken"]):
                    self._pg = None
                    self._set(member=False)
                elif store.check([f"e/{e}/msg/{seq}"]):
                    header = json.loads(store.get(f"e/{e}/msg/{seq}"))
                    seq += 1
                    self._receive(header)
                    store.add(hb_key, 1)
                    last_hb = time.monotonic()
                    continue
            self._closed.wait(self.poll_s)

    def _await_go(self, store: Any, e: int) -> bool:
        deadline = time.monotonic() + self.timeout_s
        while not self._closed.is_set() and time.monotonic() < deadline:
            if store.check([f"e/{e}/go"]):
                return True
            if int(store.get("epoch")) != e:
                return False
            time.sleep(self.poll_s)
        return False

    def _receive(self, header: dict[str, Any]) -> None:
        version, n = int(header["version"]), int(header["nbytes"])
        if int(header.get("protocol", 0)) != PROTOCOL:
            # Still take part (the broadcast needs every rank), but load nothing.
            log.warning("collective header protocol %s, this receiver speaks %d", header.get("protocol"), PROTOCOL)
        chunk = int(header["chunk_bytes"])
        buf = bytearray(n)
        data = torch.frombuffer(buf, dtype=torch.uint8)
        dev = _device(self.backend)
        staging = torch.empty(min(chunk, n), dtype=torch.uint8, device=dev) if dev.type != "cpu" else None
        try:
            for off, size in _chunks(n, chunk):
                if staging is None:
                    _broadcast(self._pg, data[off:off + size], self.timeout_s)
                else:
                    _broadcast(self._pg, staging[:size], self.timeout_s)
                    data[off:off + size].copy_(staging[:size])
        except Exception as err:  # noqa: BLE001
            log.warning("collective receive of version %d failed (%s); leaving the epoch",
                        version, str(err).splitlines()[0] if str(err) else type(err).__name__)
            self._pg = None
            with self._lock:
                self._status.failed[version] = "broken"
                self._status.member = False
                self._lock.notify_all()
            return
        try:
            got = buffer_checksum(buf) if int(header.get("protocol", 0)) == PROTOCOL else ""
        except ValueError:
            got = ""
        with self._lock:
            if got != header["sha256"]:
                log.warning("collective version %d: checksum mismatch (header %s…, received %s…)", version,
                            str(header["sha256"])[:16], got[:16])
                self._status.failed[version] = "checksum"
            else:
                self._staged = StagedVersion(version, got, buf)
                self._status.staged_version, self._status.staged_checksum = version, got
                self._status.received_versions += 1
                self._status.received_bytes += n
            for old in [v for v in self._status.failed if v < version - 64]:
                del self._status.failed[old]
            self._lock.notify_all()


# -- what the learner and the members plug in ------------------------------------------------------

class CollectivePublisher:
    """A `WeightServer` whose every published version is also offered to a `CollectiveSender`
    (what the learner loop gets as its `weights`); anything else goes to the server."""

    def __init__(self, server: Any, sender: CollectiveSender) -> None:
        self.server = server
        self.sender = sender

    def publish(self, version: int, state_dict: Any, *, dtype: Any = None) -> None:
        self.server.publish(version, state_dict, dtype=dtype)
        self.sender.offer_from_server(self.server, version)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


@dataclass(frozen=True)
class Staged:
    """A version a member holds, verified against the broadcast header, ready to load."""

    version: int
    checksum: str
    nbytes: int


class LocalCollectiveLink:
    """The member side of an engine in this process (the torch engine): a `CollectiveReceiver`
    on a thread here; `apply` loads the staged bytes with `load(pairs, version)`. vLLM's
    counterpart runs the receiver inside its workers (`rlrt_core.engines.vllm_engine`).
    `WeightSync` calls connect -> wait -> apply."""

    def __init__(self, load: Callable[[Any, int], None]) -> None:
        self._load = load
        self._rx: CollectiveReceiver | None = None
        self._key: tuple[str, str] | None = None
        self._taken: StagedVersion | None = None

    def connect(self, info: SenderInfo, timeout_s: float) -> None:
        """Join the sender `info` names (a no-op when already joined to it)."""
        key = (info.address, info.backend)
        if key == self._key:
            return
        self.close()
        self._rx = CollectiveReceiver(info.address, backend=info.backend, timeout_s=timeout_s)
        self._key = key

    def status(self) -> ReceiverStatus:
        return self._rx.status() if self._rx is not None else ReceiverStatus()

    def wait(self, version: int, timeout_s: float) -> tuple[Staged | None, str]:
        """(a staged version >= `version`, "") or (None, why) -- see `CollectiveReceiver.wait`."""
        if self._rx is None:
            return None, "no_sender"
        got, why = self._rx.wait(version, timeout_s)
        if got is None:
            return None, why
        self._taken = got
        return Staged(got.version, got.checksum, got.nbytes), ""

    def apply(self, staged: Staged) -> None:
        taken, self._taken = self._taken, None
        if taken is None or taken.version != staged.version:
            raise RuntimeError(f"version {staged.version} is not the one staged")
        self._load(taken.items(), taken.version)

    def close(self) -> None:
        if self._rx is not None:
            self._rx.close()
        self._rx, self._key, self._taken = None, None, None
