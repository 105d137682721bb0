"""gRPC WeightService: the learner serves its latest weight versions to rollout workers and
teacher scorers.

Each published version is copied once into one safetensors-format buffer (8-byte header
length, JSON header, tensor bytes), so the version the learner keeps training on can
change underneath without touching what is being served, and the same bytes can be
written to disk (`write_safetensors`) for engines that load files. The last
`keep_versions` versions are kept; versions are strictly increasing.

Dtype: `publish(..., dtype=)` casts on that same copy (e.g. fp32 master weights published as
bf16 for engines that serve bf16: half the bytes on every hop); the checksum covers the
published bytes.

Deltas (wire format 2, see protos/rlrt/v1/weights.proto and `delta`): a client that holds a
kept version B asks for V as a delta from B. The encoded change of each (B, V) pair is
computed once, by the first stream that needs it (tensors on a thread pool), and shared by
every other stream that asks for it until B or V is evicted. A base that is not kept (or
whose checksum differs from the client's), or a layout change, is answered with V in full.

The learner's critical path is one memory copy: `publish` copies device tensors straight
into the buffer and returns; the sha256 checksum is computed on a background thread
(hashlib releases the GIL), since clients need it only with the last message of a
stream. The buffer of an evicted version that no stream is reading is reused by the next
publish of the same layout: fresh memory costs page faults that were 3-10x the copy
itself on the development machine. With `keep_versions=1` the one kept version's buffer is
overwritten in place when no stream reads it (a new buffer only while one does, freed
after it), so the learner holds one copy of the weights for serving, not two.

Security: every RPC except Health needs `authorization: Bearer <token>` metadata (token
compared in constant time; refused calls end UNAUTHENTICATED). With `tls_cert`/`tls_key`
the port speaks TLS; without, the token travels in clear text, so keep plain-text servers
on loopback or a private network.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import struct
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import grpc
import torch

from rlrt_core.proto import weights_pb2 as wpb
from rlrt_core.proto import weights_pb2_grpc as wgrpc
from rlrt_core.transport.codec import DTYPE_TO_TORCH, TORCH_TO_DTYPE, VersionHasher
from rlrt_core.weights import delta as deltas
from rlrt_core.weights.records import ensure_token_file, load_token  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
MD_VERSION = "x-rlrt-version"
MD_REQUESTED = "x-rlrt-requested-version"
MD_SUBSTITUTED = "x-rlrt-substituted"
MD_ENCODING = "x-rlrt-encoding"            # "full" or "delta" (the whole stream)
MD_BASE = "x-rlrt-base-version"            # the base of a delta stream, else -1
MD_DELTA_REFUSED = "x-rlrt-delta-refused"  # why a delta request is answered in full
WIRE_FORMAT = 2
# Room for the chunk's name, shape and framing beside its data.
MESSAGE_OVERHEAD = 1 << 20


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def max_message_bytes(chunk_bytes: int) -> int:
    """gRPC message size limit for a given chunk size (set on both ends explicitly)."""
    return chunk_bytes + MESSAGE_OVERHEAD


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offsets in the version buffer
    end: int


@dataclass(eq=False)
class _Version:
    version: int
    buffer: bytearray
    tensors: tuple[_Tensor, ...]
    checksum_future: futures.Future
    total_bytes: int
    published_at: float
    readers: int = 0        # streams sending it right now (guarded by the server lock)
    evicted: bool = False

    @property
    def checksum(self) -> str:
        return self.checksum_future.result()

    @property
    def layout(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        return tuple((t.name, t.dtype, t.shape) for t in self.tensors)


def _hash_version(buf: bytearray, tensors: tuple[_Tensor, ...]) -> str:
    hasher = VersionHasher()
    view = memoryview(buf)
    for t in tensors:
        hasher.begin_tensor(t.name, t.dtype, t.shape, t.end - t.start)
        hasher.update(view[t.start:t.end])
    return hasher.hexdigest()


def _build_version(version: int, state_dict: Mapping[str, torch.Tensor], hasher: futures.Executor,
                   spare: bytearray | None = None, dtype: torch.dtype | None = None,
                   writing: list[bytearray] | None = None) -> _Version:
    """Copy `state_dict` into one safetensors-format buffer (`spare` when its size fits),
    floating-point tensors cast to `dtype` (None = as they are) on that copy; checksum it
    on `hasher`. Every tensor is checked before the first byte is written; `writing`, when
    given, receives the buffer just before that (so a caller knows what a failure dirtied)."""
    items = []
    header: dict[str, Any] = {}
    offset = 0
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.dtype not in TORCH_TO_DTYPE:
            raise ValueError(f"state_dict[{name!r}] has dtype {t.dtype}, which has no safetensors name")
        out = dtype if dtype is not None and t.is_floating_point() else t.dtype
        n = t.numel() * out.itemsize
        header[name] = {"dtype": TORCH_TO_DTYPE[out], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        items.append((name, t, offset, n))
        offset += n
    header["__metadata__"] = {"rlrt_version": str(version)}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads the header to 8 bytes
    base = 8 + len(head)
    # Every byte of the buffer is written below, so a recycled one needs no clearing.
    buf = spare if spare is not None and len(spare) == base + offset else bytearray(base + offset)
    if writing is not None:
        writing.append(buf)
    buf[:8] = struct.pack("<Q", len(head))
    buf[8:base] = head
    tensors = []
    for name, t, off, n in items:
        meta = header[name]
        if n:
            # One copy, device -> buffer, casting on the way (a CUDA tensor is not staged
            # through another CPU copy; copy_ reads strided sources as they are).
            dst = torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=base + off)
            dst.view(DTYPE_TO_TORCH[meta["dtype"]]).view(t.shape).copy_(t.detach())
        tensors.append(_Tensor(name, meta["dtype"], tuple(meta["shape"]), base + off, base + off + n))
    frozen = tuple(tensors)
    return _Version(version=version, buffer=buf, tensors=frozen, checksum_future=hasher.submit(_hash_version, buf, frozen),
                    total_bytes=offset, published_at=time.time())


class _TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without the shared token (Health is open: it reveals only the version)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong weights token "
                                                           "(metadata 'authorization: Bearer <token>')")

        def deny_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            deny(request, context)
            yield from ()

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if details.method.endswith("/Health"):
            return continuation(details)
        given = ""
        for key, value in details.invocation_metadata or ():
            if key == AUTH_HEADER:
                given = value
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(details)
        return self._deny_stream if details.method.endswith("/StreamWeights") else self._deny_unary


class _Servicer(wgrpc.WeightServiceServicer):
    def __init__(self, server: "WeightServer") -> None:
        self._s = server

    def GetLatestVersion(self, request: wpb.GetLatestVersionRequest, context: grpc.ServicerContext) -> wpb.VersionInfo:
        v, versions = self._s._snapshot()
        if request.HasField("version"):
            v = self._s._find(request.version)
        if v is None:
            return wpb.VersionInfo(version=-1, available_versions=versions)
        return wpb.VersionInfo(version=v.version, total_bytes=v.total_bytes, num_tensors=len(v.tensors),
                               checksum=v.checksum, available_versions=versions)

    def Health(self, request: wpb.HealthRequest, context: grpc.ServicerContext) -> wpb.HealthResponse:
        v, _ = self._s._snapshot()
        return wpb.HealthResponse(serving=True, latest_version=-1 if v is None else v.version,
                                  uptime_s=time.monotonic() - self._s._started)

    def StreamWeights(self, request: wpb.StreamWeightsRequest, context: grpc.ServicerContext) -> Iterator[wpb.WeightChunk]:
        requested = request.version if request.HasField("version") else -1
        v = self._s._acquire(requested)
        if v is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no weight version has been published yet")
        base: _Version | None = None
        try:
            payloads, refused = None, ""
            if request.HasField("base_version"):
                base, encoding, refused = self._s._acquire_base(request, v)
                if base is not None:
                    try:
                        payloads = self._s._delta(base, v, encoding)
                    except Exception as err:  # noqa: BLE001 - an encoder failure must not fail the pull
                        log.exception("delta %d -> %d failed; sending the full version", base.version, v.version)
                        refused = f"encoding failed: {err}"
                        self._s._release(base)
                        base, payloads = None, None
            yield from self._send(v, requested, request, context, base, payloads, refused)
        finally:
            self._s._release(v)
            if base is not None:
                self._s._release(base)

    def _send(self, v: _Version, requested: int, request: wpb.StreamWeightsRequest, context: grpc.ServicerContext,
              base: _Version | None, payloads: list[tuple[str, bytes]] | None,
              refused: str) -> Iterator[wpb.WeightChunk]:
        substituted = requested >= 0 and requested != v.version
        if substituted:
            log.info("version %d is not kept (have %s); streaming %d", requested, self._s.versions, v.version)
        is_delta = payloads is not None
        base_version = base.version if is_delta else -1
        md = [(MD_VERSION, str(v.version)), (MD_REQUESTED, str(requested)),
              (MD_SUBSTITUTED, "1" if substituted else "0"), (MD_ENCODING, "delta" if is_delta else "full"),
              (MD_BASE, str(base_version))]
        if request.HasField("base_version") and not is_delta:
            md.append((MD_DELTA_REFUSED, refused))
        context.send_initial_metadata(tuple(md))
        self._s._count_stream("delta" if is_delta else "full")
        chunk = min(request.chunk_bytes or self._s.chunk_bytes, self._s.chunk_bytes)
        view = memoryview(v.buffer)
        n_tensors = len(v.tensors)
        for index, t in enumerate(v.tensors):
            size = t.end - t.start
            if is_delta:
                encoding, payload = payloads[index]
                data, start = memoryview(payload), 0
            else:
                encoding, data, start = deltas.FULL, view, t.start
            total = len(data) if is_delta else size
            offset = 0
            while True:
                take = min(chunk, total - offset)
                piece = bytes(data[start + offset: start + offset + take])
                self._s._count_sent(len(piece))
                yield wpb.WeightChunk(version=v.version, requested_version=requested, name=t.name, dtype=t.dtype,
                                      shape=t.shape, offset=offset, tensor_bytes=size, data=piece,
                                      tensor_index=index, num_tensors=n_tensors, encoding=encoding,
                                      base_version=base_version, encoded_bytes=total, wire_format=WIRE_FORMAT)
                offset += take
                if offset >= total:
                    break
            if not context.is_active():  # client went away: stop copying
                return
        yield wpb.WeightChunk(version=v.version, requested_version=requested, num_tensors=n_tensors, final=True,
                              checksum=v.checksum, base_version=base_version, wire_format=WIRE_FORMAT)


class WeightServer:
    """Serves published weight versions over gRPC.

    token: shared secret clients must send. host/port: bind address (port 0 = free port,
    see `.port` after `start`). keep_versions: versions kept for clients still pulling.
    chunk_bytes: largest tensor piece per message (clients may ask for less).
    tls_cert / tls_key: PEM paths; both set = TLS. delta_encoding: the encoding of delta
    streams ("sparse" | "xor-zstd"; the other when a client does not decode it).
    encode_threads: threads that encode the tensors of one delta.

    `bytes_sent` counts tensor payload bytes sent over all streams (the learner's egress);
    `streams` counts streams by kind ("full", "delta").
    """

    def __init__(self, *, token: str, host: str = "127.0.0.1", port: int = 0, keep_versions: int = 2,
                 chunk_bytes: int = 4 << 20, tls_cert: str | None = None, tls_key: str | None = None,
                 max_workers: int = 8, delta_encoding: str = "sparse", encode_threads: int = 4) -> None:
        if delta_encoding not in deltas.ENCODINGS:
            raise ValueError(f"delta_encoding must be one of {', '.join(deltas.ENCODINGS)}, got {delta_encoding!r}")
        if not token:
            raise ValueError("WeightServer needs a non-empty shared token")
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        self.host = host
        self.port = port
        self.keep_versions = keep_versions
        self.chunk_bytes = chunk_bytes
        self._token = token
        self._tls = (tls_cert, tls_key) if tls_cert else None
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._versions: dict[int, _Version] = {}
        self._latest: _Version | None = None
        self._spare: bytearray | None = None  # buffer of an evicted, unread version
        self._server: grpc.Server | None = None
        self._hasher = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-sha256")
        self._encoder = futures.ThreadPoolExecutor(max_workers=max(1, encode_threads), thread_name_prefix="weights-delta")
        self._started = time.monotonic()
        self.delta_encoding = delta_encoding
        # (base, target, encoding) -> future of the per-tensor [(encoding, payload)]
        self._deltas: dict[tuple[int, int, str], futures.Future] = {}
        self._count_lock = threading.Lock()
        self.bytes_sent = 0
        self.streams: dict[str, int] = {"full": 0, "delta": 0}

    @classmethod
    def from_config(cls, transport: Any, *, token: str | None = None, host: str | None = None,
                    port: int | None = None) -> "WeightServer":
        """Build from a `TransportConfig` (token from `load_token` unless given; host/port
        override weights_host/weights_port, e.g. for a relay)."""
        return cls(token=token or load_token(transport), host=transport.weights_host if host is None else host,
                   port=transport.weights_port if port is None else port,
                   keep_versions=transport.keep_versions, chunk_bytes=transport.weights_chunk_bytes,
                   tls_cert=transport.tls_cert, tls_key=transport.tls_key,
                   delta_encoding=transport.weights_delta_encoding)

    @classmethod
    def start_from_config(cls, transport: Any, *, field: str, host: str | None = None, port: int | None = None,
                          attempts: int = 20, delay_s: float = 0.5) -> "WeightServer":
        """Build (see `from_config`) and start. Port 0 lets the kernel pick a free port; a fixed
        port held by another process (a restarted server's old socket) is retried for a while,
        then reported naming `field`, the config key that set it."""
        want = transport.weights_port if port is None else port
        last: Exception | None = None
        for _ in range(attempts if want else 1):
            server = cls.from_config(transport, host=host, port=port)
            try:
                server.start()
                return server
            except RuntimeError as err:
                last = err
                time.sleep(delay_s)
        where = transport.weights_host if host is None else host
        raise RuntimeError(f"{field} {want} on {where} stays in use ({last}); free it or set {field}: 0 "
                           "to let the server pick a free port")

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> int:
        """Bind and start serving; returns the port."""
        if self._server is not None:
            return self.port
        limit = max_message_bytes(self.chunk_bytes)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="weights"),
                             interceptors=[_TokenInterceptor(self._token)],
                             options=[("grpc.max_send_message_length", limit),
                                      ("grpc.max_receive_message_length", 1 << 20),
                                      ("grpc.so_reuseport", 0)])
        wgrpc.add_WeightServiceServicer_to_server(_Servicer(self), server)
        address = f"{self.host}:{self.port}"
        if self._tls:
            cert, key = (Path(p).read_bytes() for p in self._tls)
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            bound = server.add_insecure_port(address)
        if bound == 0:
            raise RuntimeError(f"weight server could not bind {address}")
        server.start()
        self.port = bound
        self._server = server
        self._started = time.monotonic()
        log.info("weight server on %s:%d (%s)", self.host, bound, "TLS" if self._tls else "plain text")
        return bound

    def stop(self, grace_s: float | None = 2.0) -> None:
        """Stop serving; in-flight streams get `grace_s` seconds to finish."""
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None

    def __enter__(self) -> "WeightServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """host:port clients dial (loopback when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "[::]", "::") else self.host
        return f"{host}:{self.port}"

    # -- versions -------------------------------------------------------------------------

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor], *,
                dtype: torch.dtype | str | None = None) -> None:
        """Serve `state_dict` ({name: tensor}, any device) as `version`, which must exceed
        every version published before; floating-point tensors are cast to `dtype` (a torch
        dtype or "float32" / "bfloat16" / "float16"; None = as they are) on the one copy
        into the version buffer. The tensors are copied before this returns, so the caller
        may keep updating them; `checksum(version)` waits for the checksum."""
        if isinstance(dtype, str):
            dtype = _DTYPES.get(dtype)
            if dtype is None:
                raise ValueError(f"publish dtype must be one of {', '.join(_DTYPES)}")
        with self._lock:
            if self._latest is not None and version <= self._latest.version:
                raise ValueError(f"weight versions must increase: {version} <= latest {self._latest.version}")
            old = self._latest
            if self.keep_versions == 1 and old is not None and old.readers == 0 and old.checksum_future.done():
                # One kept version that nothing reads: overwrite its buffer in place, under the
                # lock (a stream that starts meanwhile waits for the copy, then sends the new
                # version), so the learner holds one version buffer, not two (docs/BENCHMARKS.md).
                writing: list[bytearray] = []
                try:
                    built = _build_version(int(version), state_dict, self._hasher, old.buffer, dtype, writing)
                except BaseException:
                    if writing and writing[0] is old.buffer:  # half overwritten: stop serving it
                        old.evicted = True
                        self._versions.pop(old.version, None)
                        self._latest = None
                    raise
                old.evicted = True
                self._versions = {built.version: built}
                self._latest = built
                self._deltas.clear()
                return
            spare, self._spare = self._spare, None
        built = _build_version(int(version), state_dict, self._hasher, spare, dtype)
        with self._lock:
            if self._latest is not None and version <= self._latest.version:  # a concurrent publish won
                raise ValueError(f"weight versions must increase: {version} <= latest {self._latest.version}")
            self._versions[built.version] = built
            self._latest = built
            for old in sorted(self._versions)[:-self.keep_versions]:
                gone = self._versions.pop(old)
                gone.evicted = True
                self._recycle(gone)
            for key in [k for k in self._deltas if k[0] not in self._versions or k[1] not in self._versions]:
                del self._deltas[key]  # streams already sending it hold their own reference

    def _recycle(self, v: _Version) -> None:
        # Lock held. Reuse only when nothing reads the bytes any more (no stream, hash done).
        # With one kept version the next publish overwrites that one in place instead: a
        # spare would be a second full copy of the weights held for good.
        if v.evicted and v.readers == 0 and v.checksum_future.done() and self._spare is None and self.keep_versions > 1:
            self._spare = v.buffer

    @property
    def latest_version(self) -> int | None:
        with self._lock:
            return None if self._latest is None else self._latest.version

    @property
    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._versions)

    def _kept(self, version: int) -> _Version:
        # Lock held.
        if version not in self._versions:
            raise KeyError(f"weight version {version} is not kept (have {sorted(self._versions)})")
        return self._versions[version]

    def checksum(self, version: int) -> str:
        """sha256 checksum of a kept version (waits for the background hash)."""
        with self._lock:
            v = self._kept(version)
        return v.checksum

    def hold(self, version: int) -> tuple[bytearray, Any, Any]:
        """(the safetensors-format buffer of a kept version, a callable that waits for its
        checksum, release): the buffer is not reused until `release()` is called (once), as
        for a stream reading it. The collective sender broadcasts it this way."""
        with self._lock:
            v = self._kept(version)
            v.readers += 1
        done = threading.Event()

        def release() -> None:
            if not done.is_set():
                done.set()
                self._release(v)

        return v.buffer, lambda: v.checksum, release

    def write_safetensors(self, version: int, path: str | os.PathLike[str]) -> Path:
        """Write a kept version as a .safetensors file (e.g. under /dev/shm for an engine
        that loads from disk); atomic rename, returns the path."""
        with self._lock:
            v = self._kept(version)
            v.readers += 1
        try:
            dst = Path(path)
            tmp = dst.with_name(dst.name + ".tmp")
            with open(tmp, "wb") as fh:
                fh.write(v.buffer)
            os.replace(tmp, dst)
            return dst
        finally:
            self._release(v)

    def _acquire(self, requested: int) -> _Version | None:
        """The version a stream should send (requested if kept, else latest), marked as read."""
        with self._lock:
            v = self._versions.get(requested) if requested >= 0 else None
            v = v or self._latest
            if v is not None:
                v.readers += 1
            return v

    def _acquire_base(self, request: wpb.StreamWeightsRequest, v: _Version) -> tuple[_Version | None, str, str]:
        """(the kept base a delta to `v` can start from (marked as read), the encoding to
        use, "") or (None, "", why no delta)."""
        wanted = int(request.base_version)
        encoding = next((e for e in (self.delta_encoding, *deltas.ENCODINGS) if e in request.encodings), None)
        if encoding is None:
            return None, "", f"no delta encoding in common (client: {list(request.encodings)}, server: {list(deltas.ENCODINGS)})"
        with self._lock:
            base = self._versions.get(wanted)
            if base is None:
                return None, "", f"base version {wanted} is not kept (have {sorted(self._versions)})"
            base.readers += 1
        # Checksum and layout outside the lock (the checksum may still be computing).
        why = ""
        if base.checksum != request.base_checksum:
            why = f"base version {wanted} has another checksum here"
        elif base.layout != v.layout:
            why = f"the tensors of version {v.version} differ in names, dtypes or shapes from version {wanted}"
        if why:
            self._release(base)
            return None, "", why
        return base, encoding, ""

    def _delta(self, base: _Version, v: _Version, encoding: str) -> list[tuple[str, bytes]]:
        """Per tensor (encoding, payload) of `v` as a change from `base`; computed once per
        pair, by the first caller (others wait for it)."""
        key = (base.version, v.version, encoding)
        with self._lock:
            fut = self._deltas.get(key)
            owner = fut is None
            if owner:
                fut = self._deltas[key] = futures.Future()
        if not owner:
            return fut.result()
        try:
            t0 = time.perf_counter()
            src, dst = memoryview(base.buffer), memoryview(v.buffer)

            def one(t: _Tensor) -> tuple[str, bytes]:
                itemsize = DTYPE_TO_TORCH[t.dtype].itemsize
                enc = encoding
                if enc == "sparse" and (t.end - t.start) // max(itemsize, 1) >= 1 << 32:
                    enc = "xor-zstd"
                return enc, deltas.encode(enc, src[t.start:t.end], dst[t.start:t.end], itemsize)

            result = list(self._encoder.map(one, v.tensors))
            log.info("delta %d -> %d (%s): %d of %d bytes in %.2fs", base.version, v.version, encoding,
                     sum(len(p) for _, p in result), v.total_bytes, time.perf_counter() - t0)
        except BaseException as err:
            fut.set_exception(err)
            with self._lock:
                self._deltas.pop(key, None)
            raise
        fut.set_result(result)
        return result

    def _count_sent(self, n: int) -> None:
        with self._count_lock:
            self.bytes_sent += n

    def _count_stream(self, kind: str) -> None:
        with self._count_lock:
            self.streams[kind] += 1

    def _release(self, v: _Version) -> None:
        with self._lock:
            v.readers -= 1
            self._recycle(v)

    def _find(self, version: int) -> _Version | None:
        with self._lock:
            return self._versions.get(int(version))

    def _snapshot(self) -> tuple[_Version | None, list[int]]:
        with self._lock:
            return self._latest, sorted(self._versions)

