"""Metric definitions: naming conventions, constant labels, per-service registries, a real
scrape over HTTP, and docs/metrics.md generated from the definitions."""

from __future__ import annotations

import re
import typing
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from rlrt_core import metrics as M

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"", "seconds", "tokens", "nats", "messages", "versions", "bytes", "ratio", "tokens_per_second"}
NAME_RE = re.compile(r"^rlrt_[a-z][a-z0-9_]*[a-z0-9]$")


def _families(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        out.setdefault(fam.name, []).extend(fam.samples)
    return out


@pytest.mark.parametrize("spec", M.METRICS, ids=[s.name for s in M.METRICS])
def test_naming_conventions(spec: M.MetricSpec):
    assert NAME_RE.match(spec.name), spec.name
    assert spec.unit in UNITS, f"{spec.name}: unit {spec.unit!r} is not a base unit"
    stem = spec.name[: -len("_total")] if spec.kind == "counter" else spec.name
    if spec.kind == "counter":
        assert spec.name.endswith("_total"), f"counter {spec.name} must end in _total"
    else:
        assert not spec.name.endswith("_total"), f"{spec.kind} {spec.name} must not end in _total"
    if spec.unit:
        assert stem.endswith("_" + spec.unit), f"{spec.name} must end in its unit _{spec.unit}"
    subsystem = spec.name.split("_")[1]
    if len(spec.services) == 1:
        assert subsystem == spec.services[0], f"{spec.name} belongs to {spec.services[0]}"
    else:  # every service, or every pipeline stage (the relay reads no stream)
        assert spec.services in (M.SERVICES, M.PIPE), spec.services
        assert subsystem not in M.SERVICES
    assert spec.help.strip() and not spec.help[0].islower() and spec.help.endswith(".")
    if spec.label is not None:
        assert spec.label not in M.CONST_LABELS + ("le", "quantile"), spec.label
    else:
        assert not spec.label_values
    if spec.kind == "histogram":
        assert list(spec.buckets) == sorted(set(spec.buckets)) and spec.buckets
    else:
        assert not spec.buckets


def test_names_and_attributes_unique():
    names = [s.name for s in M.METRICS]
    assert len(names) == len(set(names))
    series = [n for s in M.METRICS for n in s.series_names()]
    assert len(series) == len(set(series)), "two metrics produce the same sample name"
    for svc in M.SERVICES:
        attrs = [s.attr for s in M.metric_specs(svc)]
        assert len(attrs) == len(set(attrs)), svc


@pytest.mark.parametrize("service", M.SERVICES)
def test_typed_classes_match_specs(service: str):
    """The typed attribute list of each class is exactly the service's specs."""
    cls = M.METRICS_CLASSES[service]
    hints = typing.get_type_hints(cls)
    plumbing = {"service", "run", "worker", "registry"}
    declared = set(hints) - plumbing
    specs = {s.attr: s for s in M.metric_specs(service)}
    assert declared == set(specs)
    for attr, spec in specs.items():
        want = M.LabelledMetric if spec.label else {"counter": M.Counter, "gauge": M.Gauge,
                                                    "histogram": M.Histogram}[spec.kind]
        assert hints[attr] is want, f"{cls.__name__}.{attr}: {hints[attr]} != {want}"


def test_required_metrics_present():
    """The brief's list: one metric per item, per service."""
    need = {
        "rollout": {"rlrt_rollout_generated_tokens_total", "rlrt_rollout_throughput_tokens_per_second",
                    "rlrt_rollout_completions_total", "rlrt_rollout_groups_total", "rlrt_rollout_weight_version",
                    "rlrt_rollout_weight_load_seconds", "rlrt_rollout_engine_busy_ratio"},
        "verifier": {"rlrt_verifier_rewards_total", "rlrt_verifier_timeouts_total",
                     "rlrt_verifier_completion_seconds"},
        "teacher": {"rlrt_teacher_rollouts_scored_total", "rlrt_teacher_skipped_total", "rlrt_teacher_context_total",
                    "rlrt_teacher_token_asymmetry_mean_nats", "rlrt_teacher_position_asymmetry_p90_nats",
                    "rlrt_teacher_weight_version"},
        "learner": {"rlrt_learner_step", "rlrt_learner_weight_version", "rlrt_learner_loss", "rlrt_learner_reward_mean",
                    "rlrt_learner_response_length_mean_tokens", "rlrt_learner_grad_norm", "rlrt_learner_learning_rate",
                    "rlrt_learner_mixing_lambda", "rlrt_learner_clipped_tokens_ratio", "rlrt_learner_is_weight_mean",
                    "rlrt_learner_is_weight_max", "rlrt_learner_is_truncated_tokens_ratio",
                    "rlrt_learner_upweighted_tokens_ratio", "rlrt_learner_group_staleness_versions",
                    "rlrt_learner_dropped_stale_groups_total", "rlrt_learner_skipped_nonfinite_steps_total",
                    "rlrt_learner_data_wait_seconds", "rlrt_learner_step_seconds",
                    "rlrt_learner_throughput_tokens_per_second"},
    }
    bus = {"rlrt_bus_stream_length_messages", "rlrt_bus_pending_messages", "rlrt_bus_lag_messages",
           "rlrt_bus_dead_letter_messages"}
    for svc, names in need.items():
        have = {s.name for s in M.metric_specs(svc)}
        assert names | bus <= have, sorted((names | bus) - have)
    relay = {s.name for s in M.metric_specs("relay")}
    assert {"rlrt_relay_sent_bytes_total", "rlrt_relay_pulled_bytes_total", "rlrt_relay_weight_version",
            "rlrt_relay_pulls_total", "rlrt_relay_upstream_failures_total", "rlrt_build_info"} <= relay
    assert not relay & bus  # no stream to report on
    assert not hasattr(M.service_metrics("relay", run="r", worker="w"), "observe_bus_stats")
    rewards = next(s for s in M.METRICS if s.name == "rlrt_verifier_rewards_total")
    assert rewards.label == "outcome" and set(rewards.label_values) == {"correct", "wrong", "unparseable", "timeout"}


@pytest.mark.parametrize("service", M.SERVICES)
def test_exposition_carries_constant_labels(service: str):
    m = M.service_metrics(service, run="run-a", worker="w-0")
    assert isinstance(m, M.METRICS_CLASSES[service]) and isinstance(m.registry, CollectorRegistry)
    # touch every metric once so each family has samples
    for spec in M.metric_specs(service):
        obj = getattr(m, spec.attr)
        child = obj.labels(**{spec.label: spec.label_values[0] if spec.label_values else "x"}) if spec.label else obj
        if spec.kind == "counter":
            child.inc(2)
        elif spec.kind == "gauge":
            child.set(0.5)
        else:
            child.observe(1.0)
    fams = _families(m.exposition().decode())
    for spec in M.metric_specs(service):
        fam_name = spec.name[: -len("_total")] if spec.kind == "counter" else spec.name
        assert fam_name in fams, spec.name
        samples = [smp for smp in fams[fam_name] if smp.name in spec.series_names()]
        assert samples, spec.name
        for smp in samples:
            assert smp.labels["service"] == service and smp.labels["run"] == "run-a"
            assert smp.labels["worker"] == "w-0"
    # nothing in the registry that the catalogue does not define
    exported = {smp.name for samples in fams.values() for smp in samples}
    assert exported <= M.series_names(service), sorted(exported - M.series_names(service))


def test_registries_are_independent_and_values_land():
    a = M.service_metrics("learner", run="r", worker="a")
    b = M.service_metrics("learner", run="r", worker="b")
    a.step.set(7)
    a.staleness.observe(0)
    a.staleness.observe(3)
    a.clipped.labels(bound="high").set(0.125)
    b.step.set(1)
    fa, fb = _families(a.exposition().decode()), _families(b.exposition().decode())
    assert [s.value for s in fa["rlrt_learner_step"]] == [7.0]
    assert [s.value for s in fb["rlrt_learner_step"]] == [1.0]
    counts = {s.labels["le"]: s.value for s in fa["rlrt_learner_group_staleness_versions"]
              if s.name.endswith("_bucket")}
    assert counts["0.0"] == 1 and counts["2.0"] == 1 and counts["3.0"] == 2 and counts["+Inf"] == 2
    clip = {s.labels["bound"]: s.value for s in fa["rlrt_learner_clipped_tokens_ratio"]}
    assert clip == {"low": 0.0, "high": 0.125, "dual": 0.0}  # closed set pre-created at 0
    shared = CollectorRegistry()
    M.service_metrics("verifier", run="r", worker="v", registry=shared)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        M.service_metrics("verifier", run="r", worker="v2", registry=shared)


def test_bad_input_named():
    with pytest.raises(ValueError, match="unknown service 'trainer'"):
        M.service_metrics("trainer", run="r", worker="w")
    with pytest.raises(ValueError, match="'worker' must be a non-empty string"):
        M.service_metrics("rollout", run="r", worker="")
    m = M.service_metrics("verifier", run="r", worker="w")
    with pytest.raises(ValueError, match=r"outcome='maybe' is not one of correct, wrong, unparseable, timeout"):
        m.rewards.labels(outcome="maybe")
    with pytest.raises(ValueError, match="exactly one label 'outcome'"):
        m.rewards.labels(reason="x")
    with pytest.raises(ValueError, match="must not be empty"):
        m.errors.labels(kind="")


def test_bus_stats_and_build_info():
    m = M.service_metrics("learner", run="r", worker="w")
    m.set_bus_stats("rollouts", length=10, pending=2, lag=5)
    fams = _families(m.exposition().decode())

    def by_stream(name: str) -> dict[str, float]:
        return {s.labels["stream"]: s.value for s in fams[name]}

    assert by_stream("rlrt_bus_stream_length_messages") == {"rollouts": 10.0}
    assert by_stream("rlrt_bus_pending_messages") == {"rollouts": 2.0}
    assert by_stream("rlrt_bus_lag_messages") == {"rollouts": 5.0}
    # the shape StreamBus.stats() returns
    m.observe_bus_stats({
        "prompts": {"key": "rlrt:r:prompts", "length": 40, "groups": {}},
        "rollouts": {"key": "rlrt:r:rollouts", "length": 12, "groups": {
            "verifier": {"pending": 3, "lag": 7, "consumers": 2, "last_delivered_id": "1-0"}}},
        "dead": {"key": "rlrt:r:dead", "length": 4, "groups": {}},
    })
    fams = _families(m.exposition().decode())
    assert by_stream("rlrt_bus_stream_length_messages") == {"prompts": 40.0, "rollouts": 12.0, "dead": 4.0}
    assert by_stream("rlrt_bus_pending_messages") == {"prompts": 0.0, "rollouts": 3.0}
    assert by_stream("rlrt_bus_lag_messages") == {"prompts": 40.0, "rollouts": 7.0}  # no group yet: all undelivered
    assert [s.value for s in fams["rlrt_bus_dead_letter_messages"]] == [4.0]
    info = fams["rlrt_build_info"]
    assert len(info) == 1 and info[0].value == 1.0 and info[0].labels["version"]
    assert fams["rlrt_start_time_seconds"][0].value > 1.6e9


def test_real_scrape_over_http():
    """A real HTTP scrape on loopback sees the service's series (what Prometheus reads)."""
    m = M.service_metrics("rollout", run="scrape", worker="w")
    m.generated_tokens.inc(128)
    m.weight_version.set(3)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=m.registry)
    try:
        port = server.server_address[1]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    fams = _families(body)
    assert fams["rlrt_rollout_generated_tokens"][0].value == 128.0
    assert fams["rlrt_rollout_weight_version"][0].value == 3.0


def test_rate_window():
    t = [100.0]
    w = M.RateWindow(10.0, clock=lambda: t[0])
    t[0] = 102.0
    assert w.add(100) == pytest.approx(50.0)  # 100 over the 2 s since creation
    t[0] = 110.0
    assert w.add(100) == pytest.approx(20.0)  # 200 over a full 10 s window
    t[0] = 115.0
    assert w.rate() == pytest.approx(10.0)  # the first event has left the window
    t[0] = 130.0
    assert w.rate() == 0.0
    with pytest.raises(ValueError, match="window_s"):
        M.RateWindow(0)


def test_docs_match_definitions():
    text = (ROOT / "docs" / "metrics.md").read_text()
    _, _, rest = text.partition(M.DOC_BEGIN)
    block, found, _ = rest.partition(M.DOC_END)
    assert found, "docs/metrics.md lacks the generated-block markers"
    assert block.strip("\n") == M.metrics_markdown().strip("\n"), (
        "docs/metrics.md is out of date; regenerate with: python -c \"from rlrt_core.metrics import "
        "write_metrics_doc; write_metrics_doc('docs/metrics.md')\"")
    for spec in M.METRICS:
        assert f"`{spec.name}`" in block
