"""Weight distribution: gRPC WeightService (server in the learner, client in engines) and
version announcements on Redis."""

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
from rlrt_core.weights.server import WeightServer, ensure_token_file, load_token

__all__ = [
    "Announcement", "ChecksumMismatchError", "HeldTensor", "HeldVersion", "Pull", "WeightClient", "WeightServer", "WeightServiceError", "WeightStream",
    "WeightStreamError", "announce_version", "ensure_token_file", "load_token", "read_announced_version",
    "read_announcement", "wait_for_version",
]
