"""Trajectory transport: protobuf codec, Redis Streams bus, embedded Redis."""

from rlrt_core.transport.codec import (
    MalformedMessage,
    decode,
    encode,
    prompt_task,
    rollout_group,
    set_rollout_scores,
    set_verifier_results,
    tensor_from_proto,
    tensor_to_proto,
)
from rlrt_core.transport.embedded import EmbeddedRedis, redis_url_for
from rlrt_core.transport.streams import (
    STAGE_GROUPS,
    STREAM_NAMES,
    AckStatus,
    BackpressureError,
    DeadLetter,
    Entry,
    StreamBus,
    StreamStats,
    default_consumer_name,
)

__all__ = [
    "AckStatus", "BackpressureError", "DeadLetter", "EmbeddedRedis", "Entry", "MalformedMessage",
    "STAGE_GROUPS", "STREAM_NAMES", "StreamBus", "StreamStats", "decode", "default_consumer_name", "encode",
    "prompt_task", "redis_url_for", "rollout_group", "set_rollout_scores", "set_verifier_results",
    "tensor_from_proto", "tensor_to_proto",
]
