"""Every Prometheus metric rlrt exports, defined in one place.

Conventions (checked by tests/test_metrics_defs.py):
- names start with `rlrt_`, then the owning subsystem (`rollout`, `verifier`, `teacher`,
  `learner`, `relay`, `bus`) or nothing for metrics every service exports;
- a metric with a unit ends in that unit in plural base form (`_seconds`, `_tokens`,
  `_nats`, `_messages`, `_versions`, `_bytes`; `_ratio` for fractions in [0, 1]); counters end in
  `_total` (after the unit);
- every series carries the constant labels `service`, `run`, `worker`, filled in once by
  `service_metrics(...)`; a metric has at most one more label, and where the values of that
  label form a closed set they are listed in the spec and pre-created at 0 so that rates
  and dashboards show them before the first event.

`METRICS` is the catalogue; `service_metrics(service, run, worker)` builds the objects for
one service in its own `CollectorRegistry` (so a test or a process can hold several), and
`metrics_markdown()` renders the table in docs/metrics.md (a test keeps the two equal).
"""

from __future__ import annotations

import collections
import json
import importlib.metadata
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Union, overload

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from rlrt_core.stages import SERVICES as STAGE_SERVICES  # the stage table names the pipeline services

Kind = Literal["counter", "gauge", "histogram"]

CONST_LABELS: tuple[str, ...] = ("service", "run", "worker")
# Every service that exports metrics: the pipeline stages, and the weight relay (which reads
# no stream, so it has no queue or dead-letter metrics).
SERVICES: tuple[str, ...] = STAGE_SERVICES + ("relay",)
ALL = SERVICES  # shorthand for metrics every service exports
PIPE = STAGE_SERVICES  # metrics every pipeline stage exports (streams, consumer groups)

# Buckets. Seconds span a fast verifier call (ms) to a slow learner step on CPU (minutes).
SECONDS_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                                      30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
VERSION_BUCKETS: tuple[float, ...] = (0, 1, 2, 3, 4, 6, 8, 16, 32)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: `attr` is the attribute name on the service's metrics object; `name` the
    exported name; `label` an optional label beyond the constant ones, with `label_values`
    its closed set of values (empty = open set, any non-empty string)."""

    attr: str
    name: str
    kind: Kind
    unit: str
    services: tuple[str, ...]
    help: str
    label: str | None = None
    label_values: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def series_names(self) -> tuple[str, ...]:
        """The sample names this metric produces in the text exposition format."""
        if self.kind == "counter":
            return (self.name, self.name[: -len("_total")] + "_created")
        if self.kind == "histogram":
            return (self.name + "_bucket", self.name + "_sum", self.name + "_count", self.name + "_created")
        return (self.name,)


def _c(attr: str, name: str, unit: str, services: tuple[str, ...], help: str, **kw) -> MetricSpec:
    return MetricSpec(attr, name, "counter", unit, services, help, **kw)


def _g(attr: str, name: str, unit: str, services: tuple[str, ...], help: str, **kw) -> MetricSpec:
    return MetricSpec(attr, name, "gauge", unit, services, help, **kw)


def _h(attr: str, name: str, unit: str, services: tuple[str, ...], help: str, buckets=SECONDS_BUCKETS,
       **kw) -> MetricSpec:
    return MetricSpec(attr, name, "histogram", unit, services, help, buckets=tuple(buckets), **kw)


COLLECTIVE_FALLBACKS = ("no_sender", "not_member", "timeout", "broken", "checksum", "unverified", "apply")

R, V, T, L, Y = ("rollout",), ("verifier",), ("teacher",), ("learner",), ("relay",)


def _weight_sync_specs(services: tuple[str, ...]) -> tuple[MetricSpec, ...]:
    """The counters of `services.common.weight_sync.WeightSync`, one set per service that holds
    weights (rollout, teacher): pulls by kind and by source, bytes, relay and collective fallbacks."""
    svc = services[0]
    return (
        _c("weight_pulls", f"rlrt_{svc}_weight_pulls_total", "", services,
           "Weight versions pulled, by kind: full (no version held), delta (rebuilt from the held one), "
           "fallback (a delta was refused or failed its checks, and the version came in full).",
           label="kind", label_values=("full", "delta", "fallback")),
        _c("weight_received_bytes", f"rlrt_{svc}_weight_received_bytes_total", "bytes", services,
           "Weight payload bytes received from the weight server (deltas as encoded)."),
        _c("weight_source_pulls", f"rlrt_{svc}_weight_source_pulls_total", "", services,
           "Weight versions pulled, by source: a weight relay, or the learner itself.",
           label="source", label_values=("relay", "learner")),
        _c("weight_source_fallbacks", f"rlrt_{svc}_weight_source_fallbacks_total", "", services,
           "Weight relays passed over for a version, by reason: unavailable (gone or failed mid-pull), "
           "behind (did not hold the version within transport.weights_relay_wait_s).",
           label="reason", label_values=("unavailable", "behind")),
        _c("weight_collective_versions", f"rlrt_{svc}_weight_collective_versions_total", "versions", services,
           "Weight versions loaded from the collective data plane (transport.weights_backend: collective)."),
        _c("weight_collective_fallbacks", f"rlrt_{svc}_weight_collective_fallbacks_total", "", services,
           "Versions that came over gRPC instead of the collective, by reason: no_sender, not_member (not in a "
           "live group yet), timeout, broken (the broadcast failed), checksum (bytes or checksum differ from the "
           "weight server's), unverified (the weight server could not be asked), apply (the engine refused the "
           "staged version).",
           label="reason", label_values=COLLECTIVE_FALLBACKS),
    )

METRICS: tuple[MetricSpec, ...] = (
    # -- every service -------------------------------------------------------------------
    _g("build_info", "rlrt_build_info", "", ALL,
       "Always 1; the `version` label is the rlrt package version the service runs.", label="version"),
    _g("start_time", "rlrt_start_time_seconds", "seconds", ALL,
       "Unix time at which the service's metrics were created (process start)."),
    _c("errors", "rlrt_errors_total", "", ALL,
       "Errors the service recovered from, by kind (e.g. redis, decode, engine, weights, verify).",
       label="kind"),
    _c("dead_lettered", "rlrt_dead_lettered_messages_total", "messages", PIPE,
       "Stream entries this service moved to the dead-letter stream, by reason.", label="reason"),
    _c("claimed", "rlrt_bus_claimed_messages_total", "messages", PIPE,
       "Pending stream entries this service claimed from an idle (dead or stuck) consumer.",
       label="stream"),
    # bus gauges: refreshed by whichever service reads StreamBus stats (the learner does)
    _g("bus_length", "rlrt_bus_stream_length_messages", "messages", PIPE,
       "Entries held in a Redis stream (XLEN).", label="stream"),
    _g("bus_pending", "rlrt_bus_pending_messages", "messages", PIPE,
       "Entries delivered to a consumer of the stream's group but not yet acknowledged.", label="stream"),
    _g("bus_lag", "rlrt_bus_lag_messages", "messages", PIPE,
       "Entries in a stream not yet delivered to its consumer group (the queue depth).", label="stream"),
    _g("bus_dead_letter", "rlrt_bus_dead_letter_messages", "messages", PIPE,
       "Entries held in the run's dead-letter stream (`dead`)."),
    # -- rollout -------------------------------------------------------------------------
    _c("generated_tokens", "rlrt_rollout_generated_tokens_total", "tokens", R,
       "Completion tokens generated by the engine."),
    _g("tokens_per_second", "rlrt_rollout_throughput_tokens_per_second", "tokens_per_second", R,
       "Generated tokens per second over a sliding window."),
    _c("completions", "rlrt_rollout_completions_total", "", R,
       "Completions generated, by finish reason.", label="finish_reason", label_values=("stop", "length")),
    _c("groups", "rlrt_rollout_groups_total", "", R,
       "Prompt groups (K completions of one prompt) published to the rollouts stream."),
    _g("weight_version", "rlrt_rollout_weight_version", "", R,
       "Policy weight version the engine currently generates with."),
    _h("weight_load_seconds", "rlrt_rollout_weight_load_seconds", "seconds", R,
       "Time to fetch a new weight version and load it into the engine."),
    *_weight_sync_specs(R),
    _h("generate_seconds", "rlrt_rollout_generate_seconds", "seconds", R,
       "Wall time of one engine generate call (a batch of prompt groups); streaming: of one group, "
       "from admission to its last token."),
    _c("engine_busy_seconds", "rlrt_rollout_engine_busy_seconds_total", "seconds", R,
       "Seconds the engine spent generating; its rate is the busy fraction."),
    _g("engine_busy", "rlrt_rollout_engine_busy_ratio", "ratio", R,
       "Fraction of wall time the engine spent generating, over a sliding window."),
    # -- verifier ------------------------------------------------------------------------
    _c("rewards", "rlrt_verifier_rewards_total", "", V,
       "Verified completions by outcome.", label="outcome",
       label_values=("correct", "wrong", "unparseable", "timeout")),
    _c("timeouts", "rlrt_verifier_timeouts_total", "", V,
       "Completions whose answer check exceeded verifier.timeout_s (reward 0)."),
    _c("verified_groups", "rlrt_verifier_groups_total", "", V,
       "Rollout groups verified and published to the verified stream."),
    _h("completion_seconds", "rlrt_verifier_completion_seconds", "seconds", V,
       "Answer-checking time per completion."),
    # -- teacher -------------------------------------------------------------------------
    _c("rollouts_scored", "rlrt_teacher_rollouts_scored_total", "", T,
       "Rollouts scored under both the student and the teacher view."),
    _c("scored_tokens", "rlrt_teacher_scored_tokens_total", "tokens", T,
       "Response tokens scored (each scored under both views)."),
    _c("skipped", "rlrt_teacher_skipped_total", "", T,
       "Rollouts not given teacher scores, by reason (e.g. no_context, too_long, method_grpo).",
       label="reason"),
    _c("context", "rlrt_teacher_context_total", "", T,
       "Rollouts scored, by the kind of privileged context the teacher saw.", label="kind",
       label_values=("solution", "peer", "none", "unspecified")),
    _g("token_asym_mean", "rlrt_teacher_token_asymmetry_mean_nats", "nats", T,
       "Mean over response tokens of D̂_t = log P_S(y_t) - log P_T(y_t), last scored batch."),
    _g("token_asym_p90", "rlrt_teacher_token_asymmetry_p90_nats", "nats", T,
       "90th percentile over response tokens of D̂_t, last scored batch."),
    _g("position_asym_mean", "rlrt_teacher_position_asymmetry_mean_nats", "nats", T,
       "Mean over response positions of D̄_t = KL(P_S || P_T), last scored batch."),
    _g("position_asym_p90", "rlrt_teacher_position_asymmetry_p90_nats", "nats", T,
       "90th percentile over response positions of D̄_t, last scored batch."),
    _g("teacher_weight_version", "rlrt_teacher_weight_version", "", T,
       "Policy weight version the teacher scores with."),
    _h("teacher_weight_load_seconds", "rlrt_teacher_weight_load_seconds", "seconds", T,
       "Time to fetch and load a new weight version into the scoring model."),
    *_weight_sync_specs(T),
    _h("score_seconds", "rlrt_teacher_score_seconds", "seconds", T,
       "Wall time to score one batch of rollout groups under both views."),
    # -- learner -------------------------------------------------------------------------
    _g("step", "rlrt_learner_step", "", L, "Optimizer steps completed."),
    _g("learner_weight_version", "rlrt_learner_weight_version", "", L,
       "Newest weight version the learner has published."),
    _g("loss", "rlrt_learner_loss", "", L, "Policy loss of the last step (token-level mean)."),
    _g("reward_mean", "rlrt_learner_reward_mean", "", L, "Mean reward of the rollouts trained on in the last step."),
    _g("mixed_groups", "rlrt_learner_mixed_groups_ratio", "ratio", L,
       "Fraction of groups in the last step with both correct and wrong rollouts (non-zero advantage)."),
    _g("response_length", "rlrt_learner_response_length_mean_tokens", "tokens", L,
       "Mean response length of the rollouts trained on in the last step."),
    _g("entropy", "rlrt_learner_entropy_mean_nats", "nats", L, "Mean token entropy of the policy in the last step."),
    _g("grad_norm", "rlrt_learner_grad_norm", "", L, "Gradient norm before clipping, last step."),
    _g("learning_rate", "rlrt_learner_learning_rate", "", L, "Learning rate of the last step."),
    _g("mixing_lambda", "rlrt_learner_mixing_lambda", "", L,
       "Mixing weight λ of the shaped advantage in the last step (0 = GRPO)."),
    _g("clipped", "rlrt_learner_clipped_tokens_ratio", "ratio", L,
       "Fraction of tokens whose PPO ratio was clipped, by bound.", label="bound",
       label_values=("low", "high", "dual")),
    _g("is_weight_mean", "rlrt_learner_is_weight_mean", "", L,
       "Mean truncated importance weight min(π_old/π_behaviour, C) over tokens, last step."),
    _g("is_weight_max", "rlrt_learner_is_weight_max", "", L,
       "Largest importance weight π_old/π_behaviour before truncation, last step."),
    _g("is_truncated", "rlrt_learner_is_truncated_tokens_ratio", "ratio", L,
       "Fraction of tokens whose importance weight was truncated at C, last step."),
    _g("upweighted", "rlrt_learner_upweighted_tokens_ratio", "ratio", L,
       "Fraction of tokens whose shaped advantage weight w_t exceeds 1, last step."),
    _h("staleness", "rlrt_learner_group_staleness_versions", "versions", L,
       "Version lag (learner version - generation version) of each group at training time.",
       buckets=VERSION_BUCKETS),
    _c("dropped_stale", "rlrt_learner_dropped_stale_groups_total", "", L,
       "Groups dropped because their lag exceeded learner.max_staleness."),
    _c("skipped_nonfinite", "rlrt_learner_skipped_nonfinite_steps_total", "", L,
       "Optimizer steps skipped because the loss or the gradient was not finite."),
    _g("inflight_groups", "rlrt_learner_inflight_groups", "", L,
       "Prompt groups dispatched and not yet trained on (admission control)."),
    _c("trained_groups", "rlrt_learner_trained_groups_total", "", L, "Prompt groups trained on."),
    _c("trained_tokens", "rlrt_learner_trained_tokens_total", "tokens", L, "Response tokens trained on."),
    _g("learner_tokens_per_second", "rlrt_learner_throughput_tokens_per_second", "tokens_per_second", L,
       "Trained tokens per second over a sliding window."),
    _h("data_wait_seconds", "rlrt_learner_data_wait_seconds", "seconds", L,
       "Time the learner waited for scored rollouts before a step."),
    _h("step_seconds", "rlrt_learner_step_seconds", "seconds", L,
       "Wall time of one optimizer step (forward, backward, update), excluding the data wait."),
    _h("weight_publish_seconds", "rlrt_learner_weight_publish_seconds", "seconds", L,
       "Time to publish a new weight version to the WeightService."),
    _h("collective_broadcast_seconds", "rlrt_learner_collective_broadcast_seconds", "seconds", L,
       "Time to broadcast one weight version to the collective group (transport.weights_backend: collective)."),
    _c("collective_sent_bytes", "rlrt_learner_collective_sent_bytes_total", "bytes", L,
       "Weight bytes broadcast to the collective group (once per version, whatever the number of members)."),
    _g("collective_members", "rlrt_learner_collective_members", "", L,
       "Rollout workers and teacher scorers in the current collective group."),
    _c("collective_failures", "rlrt_learner_collective_failures_total", "", L,
       "Collective broadcasts or group rendezvous that failed (a member died or timed out); the group re-forms."),
    _h("checkpoint_seconds", "rlrt_learner_checkpoint_seconds", "seconds", L, "Time to write one checkpoint."),
    # -- relay -------------------------------------------------------------------------
    _g("relay_weight_version", "rlrt_relay_weight_version", "", Y,
       "Newest weight version the relay holds and serves (-1 before the first)."),
    _g("relay_announced_version", "rlrt_relay_announced_version", "", Y,
       "Newest weight version the learner has announced, as the relay last read it (-1: none)."),
    _g("relay_held_versions", "rlrt_relay_held_versions", "versions", Y,
       "Weight versions the relay holds and serves (up to transport.keep_versions)."),
    _c("relay_sent_bytes", "rlrt_relay_sent_bytes_total", "bytes", Y,
       "Weight payload bytes the relay sent to its clients (its egress; deltas as encoded)."),
    _c("relay_pulled_bytes", "rlrt_relay_pulled_bytes_total", "bytes", Y,
       "Weight payload bytes the relay received from its upstream (deltas as encoded)."),
    _c("relay_pulls", "rlrt_relay_pulls_total", "", Y,
       "Weight versions the relay pulled from upstream, by kind: full (no version held), delta (rebuilt "
       "from the held one), fallback (a delta was refused or failed its checks, and the version came in full).",
       label="kind", label_values=("full", "delta", "fallback")),
    _c("relay_upstream_failures", "rlrt_relay_upstream_failures_total", "", Y,
       "Pulls from an upstream (a fixed relay.upstream or the learner) that failed or found it behind."),
    _c("relay_client_streams", "rlrt_relay_client_streams_total", "", Y,
       "Weight versions the relay streamed to its clients (one per client pull), by kind: full or delta.",
       label="kind", label_values=("full", "delta")),
    _h("relay_pull_seconds", "rlrt_relay_pull_seconds", "seconds", Y,
       "Time to pull one new version from upstream and start serving it."),
)

def metric_specs(service: str | None = None) -> tuple[MetricSpec, ...]:
    """The specs exported by `service` (all of them when None)."""
    if service is None:
        return METRICS
    _check_service(service)
    return tuple(s for s in METRICS if service in s.services)


def series_names(service: str | None = None) -> frozenset[str]:
    """Every sample name (with `_bucket`/`_sum`/`_count`/`_created` forms) a scrape can hold."""
    return frozenset(n for s in metric_specs(service) for n in s.series_names())


def _package_version() -> str:
    try:
        return importlib.metadata.version("rlrt")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _check_service(service: str) -> None:
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}: expected one of {', '.join(SERVICES)}")


_Child = Union[Counter, Gauge, Histogram]


class LabelledMetric:
    """A metric with one label besides the constant ones: `m.labels(outcome="correct").inc()`."""

    def __init__(self, spec: MetricSpec, parent: _Child, const: dict[str, str]) -> None:
        self.spec = spec
        self._parent = parent
        self._const = const
        self._children: dict[str, _Child] = {}
        for value in spec.label_values:
            self.labels(**{spec.label: value})  # pre-create the closed set at 0

    def labels(self, **label: str) -> _Child:
        """The child series for one value of this metric's label."""
        name = self.spec.label
        if set(label) != {name}:
            raise ValueError(f"{self.spec.name} takes exactly one label {name!r}, got {sorted(label)}")
        value = str(label[name])
        child = self._children.get(value)
        if child is None:
            if not value:
                raise ValueError(f"{self.spec.name}: label {name!r} must not be empty")
            if self.spec.label_values and value not in self.spec.label_values:
                raise ValueError(f"{self.spec.name}: {name}={value!r} is not one of "
                                 f"{', '.join(self.spec.label_values)}")
            child = self._parent.labels(**self._const, **{name: value})
            self._children[value] = child
        return child


class ServiceMetrics:
    """The metrics every service exports. Attributes hold bound children (`.inc()`,
    `.set()`, `.observe()` directly) or a `LabelledMetric` for metrics with a label."""

    service: str
    run: str
    worker: str
    registry: CollectorRegistry
    build_info: LabelledMetric
    start_time: Gauge
    errors: LabelledMetric

    def __init__(self, service: str, run: str, worker: str, registry: CollectorRegistry | None = None) -> None:
        _check_service(service)
        for what, value in (("run", run), ("worker", worker)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"metrics label {what!r} must be a non-empty string, got {value!r}")
        self.service, self.run, self.worker = service, run, worker
        self.registry = registry if registry is not None else CollectorRegistry()
        const = {"service": service, "run": run, "worker": worker}
        for spec in metric_specs(service):
            labelnames = CONST_LABELS + ((spec.label,) if spec.label else ())
            if spec.kind == "counter":
                parent: _Child = Counter(spec.name, spec.help, labelnames, registry=self.registry)
            elif spec.kind == "gauge":
                parent = Gauge(spec.name, spec.help, labelnames, registry=self.registry)
            else:
                parent = Histogram(spec.name, spec.help, labelnames, registry=self.registry, buckets=spec.buckets)
            bound = LabelledMetric(spec, parent, const) if spec.label else parent.labels(**const)
            setattr(self, spec.attr, bound)
        self.build_info.labels(version=_package_version()).set(1)
        self.start_time.set(time.time())

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (what `/metrics` serves)."""
        return generate_latest(self.registry)


class PipelineMetrics(ServiceMetrics):
    """The metrics every pipeline stage exports besides the common ones: its streams'
    queue gauges, claims and dead letters."""

    dead_lettered: LabelledMetric
    claimed: LabelledMetric
    bus_length: LabelledMetric
    bus_pending: LabelledMetric
    bus_lag: LabelledMetric
    bus_dead_letter: Gauge

    def set_bus_stats(self, stream: str, *, length: int | None = None, pending: int | None = None,
                      lag: int | None = None) -> None:
        """Refresh the `rlrt_bus_*` gauges of one stream (None leaves a gauge as it was)."""
        for gauge, value in ((self.bus_length, length), (self.bus_pending, pending), (self.bus_lag, lag)):
            if value is not None:
                gauge.labels(stream=stream).set(value)

    def observe_bus_stats(self, stats: Mapping[str, Mapping[str, Any]], *, dead_stream: str = "dead") -> None:
        """Refresh every `rlrt_bus_*` gauge from `StreamBus.stats()`:
        `{name: {"length": int, "groups": {group: {"pending": int, "lag": int, ...}}}}`.
        Pending is summed over a stream's consumer groups, lag is the largest group lag (a
        stream with no group yet has delivered nothing: lag = length). The dead-letter
        stream has no consumer group; its length is `rlrt_bus_dead_letter_messages`."""
        for name, s in stats.items():
            length = int(s["length"])
            if name == dead_stream:
                self.bus_dead_letter.set(length)
                self.set_bus_stats(name, length=length)
                continue
            groups = list((s.get("groups") or {}).values())
            pending = sum(int(g["pending"]) for g in groups)
            lag = max((int(g["lag"]) for g in groups), default=length)
            self.set_bus_stats(name, length=length, pending=pending, lag=lag)


class RolloutMetrics(PipelineMetrics):
    generated_tokens: Counter
    tokens_per_second: Gauge
    completions: LabelledMetric
    groups: Counter
    weight_version: Gauge
    weight_load_seconds: Histogram
    weight_pulls: LabelledMetric
    weight_received_bytes: Counter
    weight_source_pulls: LabelledMetric
    weight_source_fallbacks: LabelledMetric
    weight_collective_versions: Counter
    weight_collective_fallbacks: LabelledMetric
    generate_seconds: Histogram
    engine_busy_seconds: Counter
    engine_busy: Gauge


class VerifierMetrics(PipelineMetrics):
    rewards: LabelledMetric
    timeouts: Counter
    verified_groups: Counter
    completion_seconds: Histogram


class TeacherMetrics(PipelineMetrics):
    rollouts_scored: Counter
    scored_tokens: Counter
    skipped: LabelledMetric
    context: LabelledMetric
    token_asym_mean: Gauge
    token_asym_p90: Gauge
    position_asym_mean: Gauge
    position_asym_p90: Gauge
    teacher_weight_version: Gauge
    teacher_weight_load_seconds: Histogram
    weight_pulls: LabelledMetric
    weight_received_bytes: Counter
    weight_source_pulls: LabelledMetric
    weight_source_fallbacks: LabelledMetric
    weight_collective_versions: Counter
    weight_collective_fallbacks: LabelledMetric
    score_seconds: Histogram


class LearnerMetrics(PipelineMetrics):
    step: Gauge
    learner_weight_version: Gauge
    loss: Gauge
    reward_mean: Gauge
    mixed_groups: Gauge
    response_length: Gauge
    entropy: Gauge
    grad_norm: Gauge
    learning_rate: Gauge
    mixing_lambda: Gauge
    clipped: LabelledMetric
    is_weight_mean: Gauge
    is_weight_max: Gauge
    is_truncated: Gauge
    upweighted: Gauge
    staleness: Histogram
    dropped_stale: Counter
    skipped_nonfinite: Counter
    inflight_groups: Gauge
    trained_groups: Counter
    trained_tokens: Counter
    learner_tokens_per_second: Gauge
    data_wait_seconds: Histogram
    step_seconds: Histogram
    weight_publish_seconds: Histogram
    collective_broadcast_seconds: Histogram
    collective_sent_bytes: Counter
    collective_members: Gauge
    collective_failures: Counter
    checkpoint_seconds: Histogram


class RelayMetrics(ServiceMetrics):
    relay_weight_version: Gauge
    relay_announced_version: Gauge
    relay_held_versions: Gauge
    relay_sent_bytes: Counter
    relay_pulled_bytes: Counter
    relay_pulls: LabelledMetric
    relay_upstream_failures: Counter
    relay_client_streams: LabelledMetric
    relay_pull_seconds: Histogram


METRICS_CLASSES: dict[str, type[ServiceMetrics]] = {
    "rollout": RolloutMetrics, "verifier": VerifierMetrics, "teacher": TeacherMetrics, "learner": LearnerMetrics,
    "relay": RelayMetrics,
}


@overload
def service_metrics(service: Literal["rollout"], run: str, worker: str,
                    registry: CollectorRegistry | None = None) -> RolloutMetrics: ...
@overload
def service_metrics(service: Literal["verifier"], run: str, worker: str,
                    registry: CollectorRegistry | None = None) -> VerifierMetrics: ...
@overload
def service_metrics(service: Literal["teacher"], run: str, worker: str,
                    registry: CollectorRegistry | None = None) -> TeacherMetrics: ...
@overload
def service_metrics(service: Literal["learner"], run: str, worker: str,
                    registry: CollectorRegistry | None = None) -> LearnerMetrics: ...
@overload
def service_metrics(service: Literal["relay"], run: str, worker: str,
                    registry: CollectorRegistry | None = None) -> RelayMetrics: ...
@overload
def service_metrics(service: str, run: str, worker: str,
                    registry: CollectorRegistry | None = None) -> ServiceMetrics: ...
def service_metrics(service: str, run: str, worker: str, registry: CollectorRegistry | None = None) -> ServiceMetrics:
    """Create one service's metrics with `service`, `run`, `worker` as constant labels, in
    `registry` (a fresh `CollectorRegistry` when None). Raises ValueError for an unknown
    service or an empty run/worker name."""
    _check_service(service)
    return METRICS_CLASSES[service](service, run, worker, registry)


def read_metrics_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a learner's metrics.jsonl (none when the file is missing); a half-written
    last line (a killed learner) is skipped. Here, not in the learner loop, because the
    launcher's progress view reads it every tick and must not import torch."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class RateWindow:
    """Amount per second over a sliding window, for the `*_tokens_per_second` gauges; fed
    with busy seconds it gives a busy fraction (`rlrt_rollout_engine_busy_ratio`). Before a
    full window has passed the rate is over the time since creation."""

    def __init__(self, window_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._start = clock()
        self._events: collections.deque[tuple[float, float]] = collections.deque()
        self._sum = 0.0

    def add(self, amount: float, now: float | None = None) -> float:
        """Record `amount` at time `now` (the clock when None) and return the current rate."""
        now = self._clock() if now is None else now
        self._events.append((now, float(amount)))
        self._sum += float(amount)
        return self.rate(now)

    def rate(self, now: float | None = None) -> float:
        """Amount per second over the last `window_s` seconds."""
        now = self._clock() if now is None else now
        while self._events and self._events[0][0] <= now - self.window_s:
            self._sum -= self._events.popleft()[1]
        span = min(self.window_s, now - self._start)
        return self._sum / span if span > 0 else 0.0


# -- documentation ---------------------------------------------------------------------

DOC_BEGIN = "<!-- BEGIN GENERATED: rlrt_core.metrics.metrics_markdown() -->"
DOC_END = "<!-- END GENERATED -->"


def metrics_markdown() -> str:
    """The metric reference of docs/metrics.md: one table per service (plus one for the
    metrics every service exports), with the attribute name on the `service_metrics` object."""
    sections = [("Every service", lambda s: s.services == ALL),
                ("Every pipeline service (not the relay)", lambda s: s.services == PIPE)]
    sections += [(f"{svc.capitalize()}", (lambda svc: lambda s: s.services == (svc,))(svc)) for svc in SERVICES]
    lines: list[str] = []
    for title, keep in sections:
        lines += [f"### {title}", "",
                  "| name | type | unit | labels (besides service, run, worker) | attribute | meaning |",
                  "|---|---|---|---|---|---|"]
        for s in METRICS:
            if not keep(s):
                continue
            if s.label:
                labels = f"`{s.label}`" + (f" ∈ {{{', '.join(s.label_values)}}}" if s.label_values else "")
            else:
                labels = "—"
            meaning = s.help.replace("|", "\\|")
            lines.append(f"| `{s.name}` | {s.kind} | {s.unit or '—'} | {labels} | `.{s.attr}` | {meaning} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def write_metrics_doc(path: str | Path) -> None:
    """Regenerate the table between the markers of docs/metrics.md in place."""
    p = Path(path)
    text = p.read_text()
    head, sep, rest = text.partition(DOC_BEGIN)
    _, sep2, tail = rest.partition(DOC_END)
    if not sep or not sep2:
        raise ValueError(f"{p} lacks the markers {DOC_BEGIN!r} ... {DOC_END!r}")
    p.write_text(f"{head}{DOC_BEGIN}\n{metrics_markdown()}{DOC_END}{tail}")
