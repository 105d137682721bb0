"""Announcing weight versions on Redis, so rollout workers and teacher scorers learn cheaply
that a newer version exists before pulling it over gRPC.

Keys of a run: hash `{prefix}:{run}:weights` (version, address, checksum, at) holds the
latest announcement; stream `{prefix}:{run}:weights:notices` keeps a short history
(blocking waits use it); pub/sub channel `{prefix}:{run}:weights:channel` carries the
version number for listeners that prefer push.

Versions only move forward: announcing a version lower than the announced one is an error
(a learner resumed from an older checkpoint must continue numbering above it, or workers
holding the newer weights would satisfy `min_version` with a policy that no longer
exists). Re-announcing the same version is allowed (idempotent restart).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

_ANNOUNCE_LUA = """
local cur = redis.call('HGET', KEYS[1], 'version')
if cur and tonumber(cur) > tonumber(ARGV[1]) then
  return redis.error_reply('version ' .. ARGV[1] .. ' is lower than the announced version ' .. cur)
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'address', ARGV[2], 'checksum', ARGV[3], 'at', ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'version', ARGV[1], 'address', ARGV[2],
           'checksum', ARGV[3], 'at', ARGV[4])
redis.call('PUBLISH', KEYS[3], ARGV[1])
return 1
"""


def weights_key(run: str, prefix: str = "rlrt") -> str:
    return f"{prefix}:{run}:weights"


def notices_key(run: str, prefix: str = "rlrt") -> str:
    return f"{prefix}:{run}:weights:notices"


def channel_name(run: str, prefix: str = "rlrt") -> str:
    return f"{prefix}:{run}:weights:channel"


@dataclass(frozen=True)
class Announcement:
    version: int
    address: str      # where the weight server listens ("" if not given)
    checksum: str     # version checksum ("" if not given)
    at: float         # unix seconds


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def announce_version(client: redis.Redis, run: str, version: int, *, prefix: str = "rlrt", address: str = "",
                     checksum: str = "", history: int = 1000) -> None:
    """Record `version` as the run's latest and notify (hash + notice stream + pub/sub, one
    atomic script). Raises ValueError if a higher version was already announced."""
    if version < 0:
        raise ValueError(f"weight versions are >= 0, got {version}")
    keys = [weights_key(run, prefix), notices_key(run, prefix), channel_name(run, prefix)]
    try:
        client.eval(_ANNOUNCE_LUA, len(keys), *keys, int(version), address, checksum, f"{time.time():.6f}", history)
    except redis.ResponseError as err:
        if "lower than the announced" in str(err):
            raise ValueError(f"cannot announce weight version {version} for run {run!r}: {err}") from None
        raise


def read_announcement(client: redis.Redis, run: str, *, prefix: str = "rlrt") -> Announcement | None:
    """The latest announcement of `run`, or None before the first."""
    raw = client.hgetall(weights_key(run, prefix))
    if not raw:
        return None
    f = {_s(k): _s(v) for k, v in raw.items()}
    return Announcement(version=int(f["version"]), address=f.get("address", ""), checksum=f.get("checksum", ""),
                        at=float(f.get("at", 0.0)))


def read_announced_version(client: redis.Redis, run: str, *, prefix: str = "rlrt") -> int | None:
    """The latest announced version of `run`, or None before the first."""
    v = client.hget(weights_key(run, prefix), "version")
    return None if v is None else int(v)


def wait_for_version(client: redis.Redis, run: str, min_version: int, *, prefix: str = "rlrt",
                     timeout_s: float | None = None, block_ms: int = 1000) -> int:
    """Block until a version >= `min_version` is announced; returns the announced version.
    Raises TimeoutError after `timeout_s` (None = wait forever)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    key = notices_key(run, prefix)
    last_id = "$"
    while True:
        current = read_announced_version(client, run, prefix=prefix)
        if current is not None and current >= min_version:
            return current
        if last_id == "$":  # remember where we looked, so a notice between the two calls is not missed
            newest = client.xrevrange(key, count=1)
            last_id = _s(newest[0][0]) if newest else "0-0"
        wait = block_ms
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no weight version >= {min_version} announced for run {run!r} "
                                   f"within {timeout_s}s (latest {current})")
            wait = max(1, min(block_ms, int(left * 1000)))
        res = client.xread({key: last_id}, count=100, block=wait)
        for _, rows in res or []:
            if rows:
                last_id = _s(rows[-1][0])
