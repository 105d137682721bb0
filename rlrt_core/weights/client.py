"""gRPC client of the WeightService: pull a weight version in chunks and hand tensors to an
engine as they complete.

    with WeightClient("127.0.0.1:50051", token=tok) as client:
        stream = client.stream()              # latest version; stream.version is known now
        engine.load_weights(stream, stream.version)   # (name, tensor) pairs, one at a time

Memory: the client holds at most one tensor under assembly plus one chunk; every
completed tensor is yielded and forgotten. The version checksum arrives with the last
message, so `stream()` can only raise `ChecksumMismatchError` after the last tensor was
yielded: an engine that loads incrementally must then discard the update (reload another
version). `fetch_state_dict` verifies before returning anything.

Deltas (wire format 2): `pull(version, held=...)` keeps a `HeldVersion` (the bytes of the
version a worker holds: one full version in host memory, in the published dtype) and asks
for the next version as a delta from it. The delta is applied to the held bytes in place,
then the sha256 of the whole rebuilt version is checked against the server's checksum
before anything is handed to the engine. A refused delta (base not kept), a checksum
mismatch or an undecodable chunk ends in a full pull; `Pull.kind` says which happened.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import grpc
import torch

from rlrt_core.proto import weights_pb2 as wpb
from rlrt_core.proto import weights_pb2_grpc as wgrpc
from rlrt_core.transport.codec import DTYPE_TO_TORCH, MalformedMessage, VersionHasher, tensor_from_bytes
from rlrt_core.weights import delta as deltas
from rlrt_core.weights.server import (
    AUTH_HEADER,
    MD_BASE,
    MD_DELTA_REFUSED,
    MD_ENCODING,
    MD_REQUESTED,
    MD_SUBSTITUTED,
    MD_VERSION,
    WIRE_FORMAT,
    load_token,
    max_message_bytes,
)

log = logging.getLogger(__name__)

_HASH_BACKLOG = 8  # chunks waiting for the verify thread


class WeightServiceError(RuntimeError):
    """A weight RPC failed; `code` is the gRPC status code. `held_intact`: set by `pull` when
    the call failed before any byte of the held version was touched (it may be reused)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.held_intact = False


class ChecksumMismatchError(WeightServiceError):
    """The received bytes do not match the version checksum: discard what was loaded."""


class WeightStreamError(WeightServiceError):
    """The server broke the chunk protocol (order, sizes) or the stream ended early."""


def _wrap(err: grpc.RpcError, target: str, what: str) -> WeightServiceError:
    code = err.code() if hasattr(err, "code") else None
    detail = err.details() if hasattr(err, "details") else str(err)
    hint = {
        grpc.StatusCode.UNAUTHENTICATED: "the server refused the token (check transport.weights_token)",
        grpc.StatusCode.UNAVAILABLE: "the server is unreachable (is the learner running? TLS settings match?)",
        grpc.StatusCode.DEADLINE_EXCEEDED: "deadline exceeded (raise transport.weights_timeout_s?)",
        grpc.StatusCode.RESOURCE_EXHAUSTED: "message larger than the limit (chunk sizes of client and server differ?)",
        grpc.StatusCode.NOT_FOUND: "nothing to serve",
    }.get(code, "")
    name = code.name if code is not None else "UNKNOWN"
    return WeightServiceError(f"{what} from weight server {target} failed: {name}: {detail}"
                              + (f" -- {hint}" if hint else ""), code)


@dataclass
class HeldTensor:
    name: str
    dtype: str              # safetensors dtype name
    shape: tuple[int, ...]
    raw: bytearray          # the tensor's bytes (little-endian)


@dataclass
class HeldVersion:
    """The bytes of one whole weight version, kept to rebuild the next one from a delta.
    Memory: `nbytes` (a full version in the published dtype) of host memory."""

    version: int
    checksum: str
    tensors: list[HeldTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(len(t.raw) for t in self.tensors)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs over the held bytes (no copy: an engine copies them into its
        own parameters, which every engine's load_weights does)."""
        for t in self.tensors:
            yield t.name, tensor_from_bytes(t.raw, t.dtype, t.shape)

    def compute_checksum(self) -> str:
        """The version checksum of the held bytes (as the server computes it)."""
        hasher = VersionHasher()
        for t in self.tensors:
            hasher.begin_tensor(t.name, t.dtype, t.shape, len(t.raw))
            hasher.update(t.raw)
        return hasher.hexdigest()


@dataclass
class Pull:
    """What `WeightClient.pull` did. kind: "full" (no base held), "delta", or "fallback"
    (a delta was asked for but the version came in full: `reason` says why)."""

    held: HeldVersion
    kind: str
    bytes_received: int
    reason: str = ""

    @property
    def version(self) -> int:
        return self.held.version


class WeightStream(Iterator[tuple[str, torch.Tensor]]):
    """(name, tensor) pairs of one weight version, in the server's order.

    Known before iterating: `version` (the version being sent), `requested_version`
    (-1 = latest) and `substituted` (True when the requested version was no longer kept
    and the latest is sent instead), `is_delta` / `base_version` (a delta from the held
    version passed in) or `delta_refused` (why a delta request is answered in full). After
    the last pair: `checksum`, `bytes_received`.

    held: for a delta stream, the version the delta applies to; its bytes are rebuilt in
    place and the pairs yielded are views over them. keep: remember the received tensors
    of a full stream as `kept` (a `HeldVersion` once the checksum matched).
    """

    def __init__(self, call: Any, target: str, held: HeldVersion | None = None, keep: bool = False) -> None:
        self._call = call
        self._target = target
        self._held = held
        self._keep = keep
        self.kept: HeldVersion | None = None
        try:
            md = dict(call.initial_metadata() or ())
        except grpc.RpcError as err:
            raise _wrap(err, target, "StreamWeights") from None
        if MD_VERSION not in md:  # the call ended before sending headers: surface its status
            try:
                next(call)
            except grpc.RpcError as err:
                raise _wrap(err, target, "StreamWeights") from None
            raise WeightStreamError(f"weight server {target} sent no version header")
        self.version = int(md[MD_VERSION])
        self.requested_version = int(md.get(MD_REQUESTED, -1))
        self.substituted = md.get(MD_SUBSTITUTED) == "1"
        if self.substituted:
            log.warning("weight version %d is no longer kept by %s; receiving latest version %d instead",
                        self.requested_version, target, self.version)
        self.is_delta = md.get(MD_ENCODING) == "delta"
        self.base_version = int(md.get(MD_BASE, -1))
        self.delta_refused = md.get(MD_DELTA_REFUSED, "")
        if self.is_delta and (held is None or held.version != self.base_version):
            call.cancel()
            raise WeightStreamError(f"weight server {target} sent a delta from version {self.base_version}, "
                                    f"but this client holds {None if held is None else held.version}")
        self.checksum: str | None = None
        self.bytes_received = 0
        self.num_tensors = 0
        self._it = self._pairs()

    def __iter__(self) -> "WeightStream":
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self._it)

    def cancel(self) -> None:
        """Stop receiving (e.g. the engine failed to load a tensor)."""
        self._call.cancel()

    def _pairs(self) -> Iterator[tuple[str, torch.Tensor]]:
        # Hashing runs on a helper thread (hashlib releases the GIL) while the next chunks
        # arrive; at most `_HASH_BACKLOG` chunks wait for it, which bounds the extra memory.
        # A full stream hashes the bytes as they arrive; a delta stream hashes each tensor
        # once it is rebuilt.
        hasher = VersionHasher()
        pending: deque[futures.Future] = deque()
        pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-verify")
        kept: list[HeldTensor] = []

        def submit(fn: Any, *args: Any) -> None:
            pending.append(pool.submit(fn, *args))
            while len(pending) > _HASH_BACKLOG:
                pending.popleft().result()

        name, dtype, shape, encoding = "", "", (), deltas.FULL
        buf: bytearray | None = None
        filled = size = index = 0
        try:
            for chunk in self._call:
                if chunk.final:
                    if buf is not None:
                        raise WeightStreamError(f"stream ended inside tensor {name!r} ({filled}/{len(buf)} bytes)")
                    if self.is_delta and self.num_tensors != len(self._held.tensors):
                        raise WeightStreamError(f"delta stream rebuilt {self.num_tensors} of the "
                                                f"{len(self._held.tensors)} held tensors")
                    while pending:
                        pending.popleft().result()
                    got = hasher.hexdigest()
                    if got != chunk.checksum:
                        raise ChecksumMismatchError(
                            f"weight version {self.version} from {self._target}: checksum mismatch "
                            f"(server {chunk.checksum[:16]}…, received {got[:16]}…); discard these tensors")
                    self.checksum = got
                    if self._keep and not self.is_delta:
                        self.kept = HeldVersion(self.version, got, kept)
                    return
                if chunk.version != self.version:
                    raise WeightStreamError(f"chunk of version {chunk.version} inside the stream of {self.version}")
                data = chunk.data
                if chunk.offset == 0:
                    if buf is not None:
                        raise WeightStreamError(f"tensor {name!r} incomplete when {chunk.name!r} started")
                    name, dtype, shape, size = chunk.name, chunk.dtype, tuple(chunk.shape), chunk.tensor_bytes
                    encoding, index = chunk.encoding or deltas.FULL, chunk.tensor_index
                    total = chunk.encoded_bytes or size
                    if encoding != deltas.FULL and not self.is_delta:
                        raise WeightStreamError(f"tensor {name!r} is {encoding}-encoded inside a full stream")
                    # A tensor in one chunk is copied once; a larger one is assembled in place.
                    buf = bytearray(data) if len(data) == total else bytearray(total)
                    filled = len(data) if len(data) == total else 0
                    if not self.is_delta:
                        submit(hasher.begin_tensor, name, dtype, shape, size)
                elif buf is None or chunk.name != name or chunk.offset != filled:
                    raise WeightStreamError(f"out-of-order chunk: {chunk.name!r} at offset {chunk.offset}, "
                                            f"expected {name!r} at {filled}")
                if filled != len(buf) or chunk.offset != 0:
                    if filled + len(data) > len(buf):
                        raise WeightStreamError(f"tensor {name!r} overflows its {len(buf)} bytes")
                    buf[filled: filled + len(data)] = data
                    filled += len(data)
                if not self.is_delta:
                    submit(hasher.update, data)
                self.bytes_received += len(data)
                if filled == len(buf):
                    if self.is_delta:
                        raw = self._apply(index, name, dtype, shape, size, encoding, buf)
                        submit(hasher.begin_tensor, name, dtype, shape, size)
                        submit(hasher.update, raw)
                    else:
                        raw = buf
                        if len(raw) != size:
                            raise WeightStreamError(f"tensor {name!r}: {len(raw)} bytes, header says {size}")
                    try:
                        tensor = tensor_from_bytes(raw, dtype, shape)  # shares `raw`: no second copy
                    except MalformedMessage as err:
                        raise WeightStreamError(f"tensor {name!r}: {err}") from None
                    if self._keep and not self.is_delta:
                        kept.append(HeldTensor(name, dtype, shape, raw))
                    buf = None
                    self.num_tensors += 1
                    yield name, tensor
        except grpc.RpcError as err:
            raise _wrap(err, self._target, f"StreamWeights(version {self.version})") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        raise WeightStreamError(f"weight stream of version {self.version} from {self._target} ended "
                                "before its final message")

    def _apply(self, index: int, name: str, dtype: str, shape: tuple[int, ...], size: int, encoding: str,
               payload: bytearray) -> bytearray:
        """Rebuild held tensor `index` from its delta payload, in place; its bytes."""
        held = self._held.tensors[index] if index < len(self._held.tensors) else None
        if held is None or (held.name, held.dtype, held.shape, len(held.raw)) != (name, dtype, shape, size):
            raise WeightStreamError(f"delta for tensor {index} {name!r} {dtype}{list(shape)} does not match the "
                                    f"held version {self._held.version}")
        if dtype not in DTYPE_TO_TORCH:
            raise WeightStreamError(f"tensor {name!r}: unknown dtype {dtype!r}")
        try:
            deltas.apply(encoding, payload, held.raw, DTYPE_TO_TORCH[dtype].itemsize)
        except deltas.DeltaError as err:
            raise WeightStreamError(f"delta of tensor {name!r} (version {self.base_version} -> {self.version}): "
                                    f"{err}") from None
        return held.raw


class WeightClient:
    """Client of one weight server.

    target: "host:port". token: the shared secret. tls_ca: PEM path or bytes of the CA
    that signed the server certificate (None = plain text). chunk_bytes: piece size asked
    for. timeout_s: deadline of a whole version stream; rpc_timeout_s: of the small RPCs.
    """

    def __init__(self, target: str, *, token: str, tls_ca: str | bytes | None = None, chunk_bytes: int = 4 << 20,
                 timeout_s: float = 600.0, rpc_timeout_s: float = 10.0, server_name: str | None = None) -> None:
        self.target = target
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self._metadata = ((AUTH_HEADER, f"Bearer {token}"),)
        options = [("grpc.max_receive_message_length", max_message_bytes(chunk_bytes)),
                   ("grpc.max_send_message_length", 1 << 20)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls_ca is not None:
            ca = Path(tls_ca).read_bytes() if isinstance(tls_ca, str) else tls_ca
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca), options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = wgrpc.WeightServiceStub(self._channel)

    @classmethod
    def from_config(cls, transport: Any, *, token: str | None = None, target: str | None = None) -> "WeightClient":
        """Build from a `TransportConfig`: dials `target` (e.g. the address the learner
        announced), else `weights_target`, else weights_host:weights_port."""
        host = transport.weights_host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        target = target or transport.weights_target or f"{host}:{transport.weights_port}"
        return cls(target, token=token or load_token(transport), tls_ca=transport.tls_ca,
                   chunk_bytes=transport.weights_chunk_bytes, timeout_s=transport.weights_timeout_s,
                   rpc_timeout_s=transport.weights_rpc_timeout_s)

    def version_info(self, version: int | None = None) -> wpb.VersionInfo:
        """Latest version (or `version`: then version -1 when the server no longer keeps it),
        its size, tensor count and checksum, and the kept versions."""
        request = wpb.GetLatestVersionRequest() if version is None else wpb.GetLatestVersionRequest(version=version)
        try:
            return self._stub.GetLatestVersion(request, metadata=self._metadata,
                                               timeout=self.rpc_timeout_s)
        except grpc.RpcError as err:
            raise _wrap(err, self.target, "GetLatestVersion") from None

    def latest_version(self) -> int | None:
        """The newest published version, or None before the first publish."""
        v = self.version_info().version
        return None if v < 0 else v

    def health(self) -> wpb.HealthResponse:
        try:
            return self._stub.Health(wpb.HealthRequest(), timeout=self.rpc_timeout_s)
        except grpc.RpcError as err:
            raise _wrap(err, self.target, "Health") from None

    def stream(self, version: int | None = None, *, base: HeldVersion | None = None, keep: bool = False,
               encodings: tuple[str, ...] = deltas.ENCODINGS) -> WeightStream:
        """Start receiving `version` (None = latest). If it is no longer kept the server sends
        the latest instead: check `.version` / `.substituted` before loading. With `base`,
        ask for a delta from that held version (rebuilt in place if the server agrees:
        `.is_delta`); `keep` keeps the tensors of a full stream (see WeightStream)."""
        request = wpb.StreamWeightsRequest(chunk_bytes=self.chunk_bytes, wire_format=WIRE_FORMAT)
        if version is not None:
            request.version = int(version)
        if base is not None:
            request.base_version = int(base.version)
            request.base_checksum = base.checksum
            request.encodings.extend(encodings)
        call = self._stub.StreamWeights(request, metadata=self._metadata, timeout=self.timeout_s)
        return WeightStream(call, self.target, held=base, keep=keep)

    def pull(self, version: int | None = None, held: HeldVersion | None = None, *,
             encodings: tuple[str, ...] = deltas.ENCODINGS) -> Pull:
        """A whole, verified version as a `HeldVersion`: a delta from `held` (in one of
        `encodings`) when given and the server can (rebuilt in place: `held` is consumed
        either way), else in full. The
        checksum is verified before this returns; nothing needs discarding afterwards."""
        if held is None:
            stream = self.stream(version, keep=True)
            for _ in stream:
                pass
            return Pull(stream.kept, "full", stream.bytes_received)
        delta_stream: WeightStream | None = None
        try:
            try:
                delta_stream = self.stream(version, base=held, keep=True, encodings=encodings)
            except WeightServiceError as err:
                # Nothing was applied yet (the stream did not start): the caller keeps `held`.
                err.held_intact = not isinstance(err, WeightStreamError)
                raise
            for _ in delta_stream:
                pass
            received = delta_stream.bytes_received
            if delta_stream.is_delta:
                held.version, held.checksum = delta_stream.version, delta_stream.checksum
                return Pull(held, "delta", received)
            return Pull(delta_stream.kept, "fallback", received, f"delta refused: {delta_stream.delta_refused}")
        except (ChecksumMismatchError, WeightStreamError) as err:
            # The held copy may be half-rebuilt: the caller must drop it; take the version whole.
            received = delta_stream.bytes_received if delta_stream is not None else 0
            log.warning("delta pull from %s failed (%s); pulling the full version", self.target, err)
            reason = str(err)
        stream = self.stream(version, keep=True)
        for _ in stream:
            pass
        return Pull(stream.kept, "fallback", received + stream.bytes_received, reason)

    def fetch_state_dict(self, version: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        """A whole version as (version actually received, {name: tensor}), checksum verified
        before returning."""
        stream = self.stream(version)
        tensors = dict(stream)
        return stream.version, tensors

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "WeightClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
