"""Weight distribution: gRPC WeightService (server in the learner, client in engines),
version announcements on Redis, and weight relays that re-serve versions per node.

Names are imported from their submodule on first use: the server and client load torch and
gRPC, which the launcher and the verifier (they only read the relay registry and the token,
`rlrt_core.weights.records`) must not pay for (~250 MB per process)."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Announcement": "announce", "announce_version": "announce", "read_announced_version": "announce",
    "read_announcement": "announce", "wait_for_version": "announce",
    "ChecksumMismatchError": "client", "HeldTensor": "client", "HeldVersion": "client", "Pull": "client",
    "WeightClient": "client", "WeightServiceError": "client", "WeightStream": "client",
    "WeightStreamError": "client",
    "RelaySources": "relay", "WeightRelay": "relay", "live_relays": "records",
    "WeightServer": "server", "ensure_token_file": "records", "load_token": "records",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
