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
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent import futures
from pathlib import Path
from typing import Any, Iterator

import grpc
import torch

from rlrt_core.proto import weights_pb2 as wpb
from rlrt_core.proto import weights_pb2_grpc as wgrpc
from rlrt_core.transport.codec import MalformedMessage, VersionHasher, tensor_from_bytes
from rlrt_core.weights.server import AUTH_HEADER, MD_REQUESTED, MD_SUBSTITUTED, MD_VERSION, load_token, max_message_bytes

log = logging.getLogger(__name__)

_HASH_BACKLOG = 8  # chunks waiting for the verify thread


class WeightServiceError(RuntimeError):
    """A weight RPC failed; `code` is the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


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


class WeightStream(Iterator[tuple[str, torch.Tensor]]):
    """(name, tensor) pairs of one weight version, in the server's order.

    Known before iterating: `version` (the version being sent), `requested_version`
    (-1 = latest) and `substituted` (True when the requested version was no longer kept
    and the latest is sent instead). After the last pair: `checksum`, `bytes_received`.
    """

    def __init__(self, call: Any, target: str) -> None:
        self._call = call
        self._target = target
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
        hasher = VersionHasher()
        pending: deque[futures.Future] = deque()
        pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-verify")

        def submit(fn: Any, *args: Any) -> None:
            pending.append(pool.submit(fn, *args))
            while len(pending) > _HASH_BACKLOG:
                pending.popleft().result()

        name, dtype, shape = "", "", ()
        buf: bytearray | None = None
        filled = 0
        try:
            for chunk in self._call:
                if chunk.final:
                    if buf is not None:
                        raise WeightStreamError(f"stream ended inside tensor {name!r} ({filled}/{len(buf)} bytes)")
                    while pending:
                        pending.popleft().result()
                    got = hasher.hexdigest()
                    if got != chunk.checksum:
                        raise ChecksumMismatchError(
                            f"weight version {self.version} from {self._target}: checksum mismatch "
                            f"(server {chunk.checksum[:16]}…, received {got[:16]}…); discard these tensors")
                    self.checksum = got
                    return
                if chunk.version != self.version:
                    raise WeightStreamError(f"chunk of version {chunk.version} inside the stream of {self.version}")
                data = chunk.data
                if chunk.offset == 0:
                    if buf is not None:
                        raise WeightStreamError(f"tensor {name!r} incomplete when {chunk.name!r} started")
                    name, dtype, shape = chunk.name, chunk.dtype, tuple(chunk.shape)
                    # A tensor in one chunk is copied once; a larger one is assembled in place.
                    buf = bytearray(data) if len(data) == chunk.tensor_bytes else bytearray(chunk.tensor_bytes)
                    filled = len(data) if len(data) == chunk.tensor_bytes else 0
                    submit(hasher.begin_tensor, name, dtype, shape, chunk.tensor_bytes)
                elif buf is None or chunk.name != name or chunk.offset != filled:
                    raise WeightStreamError(f"out-of-order chunk: {chunk.name!r} at offset {chunk.offset}, "
                                            f"expected {name!r} at {filled}")
                if filled != len(buf) or chunk.offset != 0:
                    if filled + len(data) > len(buf):
                        raise WeightStreamError(f"tensor {name!r} overflows its {len(buf)} bytes")
                    buf[filled: filled + len(data)] = data
                    filled += len(data)
                submit(hasher.update, data)
                self.bytes_received += len(data)
                if filled == len(buf):
                    try:
                        tensor = tensor_from_bytes(buf, dtype, shape)  # shares `buf`: no second copy
                    except MalformedMessage as err:
                        raise WeightStreamError(f"tensor {name!r}: {err}") from None
                    buf = None
                    self.num_tensors += 1
                    yield name, tensor
        except grpc.RpcError as err:
            raise _wrap(err, self._target, f"StreamWeights(version {self.version})") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        raise WeightStreamError(f"weight stream of version {self.version} from {self._target} ended "
                                "before its final message")


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

    def version_info(self) -> wpb.VersionInfo:
        """Latest version, its size, tensor count and checksum, and the kept versions."""
        try:
            return self._stub.GetLatestVersion(wpb.GetLatestVersionRequest(), metadata=self._metadata,
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

    def stream(self, version: int | None = None) -> WeightStream:
        """Start receiving `version` (None = latest). If it is no longer kept the server sends
        the latest instead: check `.version` / `.substituted` before loading."""
        request = wpb.StreamWeightsRequest(chunk_bytes=self.chunk_bytes)
        if version is not None:
            request.version = int(version)
        call = self._stub.StreamWeights(request, metadata=self._metadata, timeout=self.timeout_s)
        return WeightStream(call, self.target)

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
