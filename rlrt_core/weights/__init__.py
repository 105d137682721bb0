"""Weight distribution: gRPC WeightService (server in the learner, client in engines),
version announcements on Redis, and weight relays that re-serve versions per node."""

from rlrt_core.weights.announce import (
    Announcement,
    announce_version,
    read_announced_version,
    read_announcement,
    wait_for_version,
)
from rlrt_core.weights.client import (
    ChecksumMismatchError,
    HeldTensor,
    HeldVersion,
    Pull,
    WeightClient,
    WeightServiceError,
    WeightStream,
    WeightStreamError,
)
from rlrt_core.weights.relay import RelaySources, WeightRelay, live_relays
from rlrt_core.weights.server import WeightServer, ensure_token_file, load_token

__all__ = [
    "Announcement", "ChecksumMismatchError", "HeldTensor", "HeldVersion", "Pull", "RelaySources", "WeightClient",
    "WeightRelay", "WeightServer", "WeightServiceError", "WeightStream",
    "WeightStreamError", "announce_version", "ensure_token_file", "load_token", "read_announced_version",
    "live_relays", "read_announcement", "wait_for_version",
]
