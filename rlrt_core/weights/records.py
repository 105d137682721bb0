"""The torch-free parts of weight distribution: the relay registry on Redis and the shared
weights token. The launcher, the progress view and `rlrt status` read these; importing the
gRPC server or client would load torch (~250 MB) in processes that move no weights."""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("rlrt_core.weights.relay")


def load_token(transport: Any) -> str:
    """The shared weights token from `transport.weights_token` (or RLRT_WEIGHTS_TOKEN), else
    the first line of `transport.weights_token_file`; a clear error when neither is set."""
    if transport.weights_token:
        return str(transport.weights_token)
    if transport.weights_token_file:
        path = Path(transport.weights_token_file)
        if not path.is_file():
            raise ValueError(f"transport.weights_token_file {path} does not exist")
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"transport.weights_token_file {path} is empty")
        return token
    raise ValueError("the weight service needs a shared token: set transport.weights_token (RLRT_WEIGHTS_TOKEN) "
                     "or transport.weights_token_file (see rlrt_core.weights.ensure_token_file)")


def ensure_token_file(path: str | os.PathLike[str]) -> str:
    """Read the token in `path`, creating it (random, mode 0600) when missing: how a local
    launcher gives the learner and its workers one shared secret."""
    p = Path(path)
    if p.is_file() and p.read_text().strip():
        return p.read_text().strip()
    p.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def relays_key(run: str, prefix: str = "rlrt") -> str:
    """Set of the ids of the run's relays (live or expired: readers prune)."""
    return f"{prefix}:{run}:weights:relays"


def relay_key(run: str, relay_id: str, prefix: str = "rlrt") -> str:
    """One relay's record (JSON, with a TTL)."""
    return f"{prefix}:{run}:weights:relay:{relay_id}"


@dataclass(frozen=True)
class RelayRecord:
    relay_id: str
    address: str                # host:port its clients dial
    node: str                   # node (host) it serves
    versions: tuple[int, ...]   # versions it holds and serves
    last_seen: float            # unix seconds
    bytes_sent: int = 0         # payload bytes its server sent (its egress)
    pulled_bytes: int = 0       # payload bytes it received from upstream
    pulling: int = -1           # version it is pulling right now (-1: none)

    def to_json(self) -> str:
        return json.dumps({"relay_id": self.relay_id, "address": self.address, "node": self.node,
                           "versions": list(self.versions), "last_seen": self.last_seen,
                           "bytes_sent": self.bytes_sent, "pulled_bytes": self.pulled_bytes,
                           "pulling": self.pulling})

    @classmethod
    def from_json(cls, raw: bytes | str) -> "RelayRecord":
        d = json.loads(raw)
        return cls(relay_id=str(d["relay_id"]), address=str(d["address"]), node=str(d.get("node", "")),
                   versions=tuple(int(v) for v in d.get("versions", ())), last_seen=float(d.get("last_seen", 0.0)),
                   bytes_sent=int(d.get("bytes_sent", 0)), pulled_bytes=int(d.get("pulled_bytes", 0)),
                   pulling=int(d.get("pulling", -1)))


def register_relay(client: Any, run: str, record: RelayRecord, *, ttl_s: float, prefix: str = "rlrt") -> None:
    """Write (or refresh) a relay's record with a TTL of `ttl_s`."""
    pipe = client.pipeline(transaction=True)
    pipe.sadd(relays_key(run, prefix), record.relay_id)
    pipe.set(relay_key(run, record.relay_id, prefix), record.to_json(), px=max(1, int(ttl_s * 1000)))
    pipe.execute()


def unregister_relay(client: Any, run: str, relay_id: str, *, prefix: str = "rlrt") -> None:
    pipe = client.pipeline(transaction=True)
    pipe.srem(relays_key(run, prefix), relay_id)
    pipe.delete(relay_key(run, relay_id, prefix))
    pipe.execute()


def live_relays(client: Any, run: str, *, prefix: str = "rlrt") -> list[RelayRecord]:
    """The relays whose record has not expired (ids whose record expired are pruned)."""
    ids = sorted(i.decode() if isinstance(i, bytes) else str(i) for i in client.smembers(relays_key(run, prefix)))
    if not ids:
        return []
    raws = client.mget([relay_key(run, i, prefix) for i in ids])
    out, gone = [], []
    for rid, raw in zip(ids, raws):
        if raw is None:
            gone.append(rid)
            continue
        try:
            out.append(RelayRecord.from_json(raw))
        except (ValueError, KeyError, TypeError):
            log.warning("relay record %s is not valid JSON; ignored", rid)
    if gone:
        client.srem(relays_key(run, prefix), *gone)
    return out
