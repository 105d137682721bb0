"""The pipeline's stage table: for each stage, the stream it reads, the stream it writes, its
consumer group and the message type on its input. `StreamBus`, the launchers, the metrics and
the services read it; no stream or group name is spelled anywhere else.

    learner ──PromptTask──▶ prompts ──▶ rollout ──RolloutGroup──▶ rollouts ──▶ verifier
        ▲                                                                        │
        └── scored ◀── teacher ◀── verified ◀────────────────────────────────────┘

Each stage turns one input entry into exactly one output entry (written atomically with the
input's ack), so every dispatched group is, at any instant, exactly one unfinished entry of
one stream; `dead` holds entries that could not be processed, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from rlrt_core.proto import trajectory_pb2 as pb


@dataclass(frozen=True)
class Stage:
    service: str                 # the service that runs this stage
    input: str                   # stream it consumes
    output: str | None           # stream it publishes to (None: the learner, which trains)
    group: str                   # its consumer group on `input`
    message: type[Message]       # message type of `input` entries


# In pipeline order. The learner's dispatch writes PromptTasks to the first stream.
STAGES: tuple[Stage, ...] = (
    Stage("rollout", "prompts", "rollouts", "rollout", pb.PromptTask),
    Stage("verifier", "rollouts", "verified", "verifier", pb.RolloutGroup),
    Stage("teacher", "verified", "scored", "teacher", pb.RolloutGroup),
    Stage("learner", "scored", None, "learner", pb.RolloutGroup),
)
DISPATCH_STREAM = STAGES[0].input
DEAD_STREAM = "dead"
PIPELINE_STREAMS: tuple[str, ...] = tuple(s.input for s in STAGES)  # upstream first
STREAM_NAMES: tuple[str, ...] = PIPELINE_STREAMS + (DEAD_STREAM,)
STAGE_GROUPS: dict[str, str] = {s.input: s.group for s in STAGES}  # stream -> the group that reads it
SERVICES: tuple[str, ...] = tuple(s.service for s in STAGES)


def stage(service: str) -> Stage:
    """The stage `service` runs; ValueError for an unknown service."""
    for s in STAGES:
        if s.service == service:
            return s
    raise ValueError(f"unknown service {service!r}; expected one of {', '.join(SERVICES)}")
