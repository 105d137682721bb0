#!/usr/bin/env python3
"""Write deploy/grafana/dashboards/rlrt.json, the rlrt Grafana dashboard, from code.

    python deploy/grafana/make_dashboard.py          # rewrite the JSON
    python deploy/grafana/make_dashboard.py --check  # exit 1 if the JSON is out of date

Rows: training progress, RLRT signals, throughput/overlap, staleness, queues, errors.
Every query filters on the `run` template variable; every metric it names is defined in
rlrt_core/metrics.py (tests/test_deploy.py checks both). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "rlrt.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
R = 'run=~"$run"'  # the label filter every query carries


def q(expr: str, legend: str = "") -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend}


def hq(metric: str, quantile: float, by: str = "") -> str:
    """histogram_quantile over all replicas (and `by` labels) of a histogram metric."""
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({quantile}, sum by ({group}) (rate({metric}_bucket{{{R}}}[5m])))"


class Builder:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self._id = 0
        self._y = 0
        self._x = 0
        self._row_h = 0

    def _next_id(self) -> int:
        self._id += 1
        return self._id

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "id": self._next_id(),
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}, "panels": []})
        self._y += 1

    def _newline(self) -> None:
        if self._x:
            self._y += self._row_h
            self._x = 0
            self._row_h = 0

    def ts(self, title: str, targets: list[dict[str, Any]], *, unit: str = "short", desc: str = "",
           w: int = 8, h: int = 8, kind: str = "timeseries", min0: bool = False) -> None:
        if self._x + w > 24:
            self._newline()
        defaults: dict[str, Any] = {"unit": unit}
        if kind == "timeseries":
            defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                                  "spanNulls": True}
        if min0:
            defaults["min"] = 0
        panel: dict[str, Any] = {
            "type": kind, "title": title, "description": desc, "id": self._next_id(), "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self._x, "y": self._y},
            "targets": [dict(t, refId=chr(ord("A") + i), datasource=DS) for i, t in enumerate(targets)],
            "fieldConfig": {"defaults": defaults, "overrides": []},
        }
        if kind == "timeseries":
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                "tooltip": {"mode": "multi", "sort": "none"}}
        else:
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "colorMode": "value", "graphMode": "area", "textMode": "auto"}
        self.panels.append(panel)
        self._x += w
        self._row_h = max(self._row_h, h)


def build() -> dict[str, Any]:
    b = Builder()

    b.row("Training progress")
    b.ts("Step", [q(f"max(rlrt_learner_step{{{R}}})", "step")], kind="stat", w=4, h=4,
         desc="Optimizer steps completed.")
    b.ts("Weight version", [q(f"max(rlrt_learner_weight_version{{{R}}})", "learner")], kind="stat", w=4, h=4,
         desc="Newest version the learner published.")
    b.ts("Replicas reporting", [q(f"count by (service) (rlrt_build_info{{{R}}})", "{{service}}")],
         kind="stat", w=16, h=4, desc="Scraped replicas per service.")
    b.ts("Reward", [q(f"avg(rlrt_learner_reward_mean{{{R}}})", "trained groups (last step)"),
                    q(f'sum(rate(rlrt_verifier_rewards_total{{{R}, outcome="correct"}}[5m])) / '
                      f"sum(rate(rlrt_verifier_rewards_total{{{R}}}[5m]))", "verifier accuracy (5m)")],
         unit="percentunit", desc="Mean reward of the rollouts trained on; fraction judged correct by the verifiers.")
    b.ts("Policy loss", [q(f"avg(rlrt_learner_loss{{{R}}})", "loss")])
    b.ts("Response length", [q(f"avg(rlrt_learner_response_length_mean_tokens{{{R}}})", "mean tokens")],
         unit="none", min0=True)
    b.ts("Entropy", [q(f"avg(rlrt_learner_entropy_mean_nats{{{R}}})", "mean token entropy (nats)")], min0=True)
    b.ts("Gradient norm", [q(f"avg(rlrt_learner_grad_norm{{{R}}})", "pre-clip grad norm")], min0=True)
    b.ts("Learning rate / mixed groups", [q(f"avg(rlrt_learner_learning_rate{{{R}}})", "lr"),
                                          q(f"avg(rlrt_learner_mixed_groups_ratio{{{R}}})", "groups with mixed rewards")],
         desc="Mixed groups carry the GRPO-family signal (non-zero advantage).")

    b.row("RLRT signals")
    b.ts("Mixing λ", [q(f"avg(rlrt_learner_mixing_lambda{{{R}}})", "λ")], min0=True,
         desc="Weight of the reversed-teacher term in the shaped advantage (0 = GRPO).")
    b.ts("Up-weighted tokens", [q(f"avg(rlrt_learner_upweighted_tokens_ratio{{{R}}})", "w_t > 1")],
         unit="percentunit", min0=True)
    b.ts("PPO clipped tokens", [q(f"avg by (bound) (rlrt_learner_clipped_tokens_ratio{{{R}}})", "{{bound}}")],
         unit="percentunit", min0=True)
    b.ts("Token asymmetry D̂_t", [q(f"avg(rlrt_teacher_token_asymmetry_mean_nats{{{R}}})", "mean"),
                                 q(f"avg(rlrt_teacher_token_asymmetry_p90_nats{{{R}}})", "p90")],
         desc="log P_S(y_t) - log P_T(y_t), nats, last scored batch of each teacher.")
    b.ts("Position asymmetry D̄_t", [q(f"avg(rlrt_teacher_position_asymmetry_mean_nats{{{R}}})", "mean"),
                                    q(f"avg(rlrt_teacher_position_asymmetry_p90_nats{{{R}}})", "p90")],
         min0=True, desc="KL(P_S || P_T) per position, nats.")
    b.ts("Teacher context", [q(f"sum by (kind) (rate(rlrt_teacher_context_total{{{R}}}[5m]))", "{{kind}}")],
         unit="ops", min0=True, desc="Rollouts scored per second, by privileged context.")

    b.row("Throughput & overlap")
    b.ts("Generated tokens/s", [q(f"sum(rate(rlrt_rollout_generated_tokens_total{{{R}}}[1m]))", "all workers"),
                                q(f"sum by (worker) (rlrt_rollout_throughput_tokens_per_second{{{R}}})",
                                  "{{worker}}")], min0=True)
    b.ts("Trained tokens/s", [q(f"sum(rate(rlrt_learner_trained_tokens_total{{{R}}}[1m]))", "learner"),
                              q(f"sum(rate(rlrt_teacher_scored_tokens_total{{{R}}}[1m]))", "teacher scored")],
         min0=True)
    b.ts("Busy fractions", [q(f"rate(rlrt_rollout_engine_busy_seconds_total{{{R}}}[5m])", "engine {{worker}}"),
                            q(f"sum(rate(rlrt_learner_step_seconds_sum{{{R}}}[5m]))", "learner stepping"),
                            q(f"sum(rate(rlrt_learner_data_wait_seconds_sum{{{R}}}[5m]))", "learner waiting for data")],
         unit="percentunit", min0=True,
         desc="Overlap: engines busy while the learner steps; a learner that mostly waits is rollout-bound.")
    b.ts("Stage rates (groups/s)", [q(f"sum(rate(rlrt_rollout_groups_total{{{R}}}[5m]))", "rolled out"),
                                    q(f"sum(rate(rlrt_verifier_groups_total{{{R}}}[5m]))", "verified"),
                                    q(f"sum(rate(rlrt_learner_trained_groups_total{{{R}}}[5m]))", "trained")],
         unit="ops", min0=True)
    b.ts("Step time", [q(hq("rlrt_learner_step_seconds", 0.5), "step p50"),
                       q(hq("rlrt_learner_step_seconds", 0.9), "step p90"),
                       q(hq("rlrt_learner_data_wait_seconds", 0.9), "data wait p90")], unit="s", min0=True)
    b.ts("Weight sync (p90)", [q(hq("rlrt_learner_weight_publish_seconds", 0.9), "learner publish"),
                               q(hq("rlrt_rollout_weight_load_seconds", 0.9), "rollout load"),
                               q(hq("rlrt_teacher_weight_load_seconds", 0.9), "teacher load"),
                               q(hq("rlrt_learner_checkpoint_seconds", 0.9), "checkpoint")], unit="s", min0=True)
    b.ts("Stage latency (p90)", [q(hq("rlrt_rollout_generate_seconds", 0.9), "generate call"),
                                 q(hq("rlrt_teacher_score_seconds", 0.9), "teacher batch"),
                                 q(hq("rlrt_verifier_completion_seconds", 0.9), "verify completion")],
         unit="s", min0=True)

    b.row("Staleness")
    b.ts("Weight versions", [q(f"max(rlrt_learner_weight_version{{{R}}})", "learner"),
                             q(f"min(rlrt_rollout_weight_version{{{R}}})", "oldest rollout worker"),
                             q(f"min(rlrt_teacher_weight_version{{{R}}})", "oldest teacher"),
                             q(f"min(rlrt_relay_weight_version{{{R}}})", "oldest weight relay")])
    relayed = f"sum(rate(rlrt_relay_sent_bytes_total{{{R}}}[5m]))"
    b.ts("Weight egress", [
        q(f"sum(rate(rlrt_relay_pulled_bytes_total{{{R}}}[5m]))", "learner → relays"),
        q(f"sum(rate(rlrt_rollout_weight_received_bytes_total{{{R}}}[5m])) + "
          f"sum(rate(rlrt_teacher_weight_received_bytes_total{{{R}}}[5m])) - ({relayed} or vector(0))",
          "learner → workers (direct)"),
        q(relayed, "relays → workers")], unit="Bps", min0=True,
        desc="Weight payload bytes/s. With relays (transport.weights_relay: auto) the learner sends one copy per "
             "version per relay and the relays fan it out; the first two lines together are the learner's egress.")
    b.ts("Trained-group staleness", [
        q(f"sum(rate(rlrt_learner_group_staleness_versions_sum{{{R}}}[5m])) / "
          f"sum(rate(rlrt_learner_group_staleness_versions_count{{{R}}}[5m]))", "mean"),
        q(hq("rlrt_learner_group_staleness_versions", 0.9), "p90"),
        q(f"max(rlrt_learner_weight_version{{{R}}}) - min(rlrt_rollout_weight_version{{{R}}})",
          "version lag of slowest worker")], min0=True, desc="Versions between generation and training.")
    b.ts("Admission", [q(f"sum(rlrt_learner_inflight_groups{{{R}}})", "in-flight groups"),
                       q(f"sum(increase(rlrt_learner_dropped_stale_groups_total{{{R}}}[5m]))", "dropped stale (5m)")],
         min0=True)
    b.ts("Importance weights", [q(f"avg(rlrt_learner_is_weight_mean{{{R}}})", "mean (truncated)"),
                                q(f"max(rlrt_learner_is_weight_max{{{R}}})", "max (raw)")],
         desc="π_old / π_behaviour per token; truncated at C.")
    b.ts("IS-truncated tokens", [q(f"avg(rlrt_learner_is_truncated_tokens_ratio{{{R}}})", "truncated at C")],
         unit="percentunit", min0=True)

    b.row("Queues")
    b.ts("Queue depth (undelivered)", [q(f"max by (stream) (rlrt_bus_lag_messages{{{R}}})", "{{stream}}")],
         min0=True, desc="Entries not yet delivered to the stream's consumer group.")
    b.ts("Pending (delivered, not acked)", [q(f"max by (stream) (rlrt_bus_pending_messages{{{R}}})", "{{stream}}")],
         min0=True)
    b.ts("Stream length", [q(f"max by (stream) (rlrt_bus_stream_length_messages{{{R}}})", "{{stream}}")], min0=True)

    b.row("Errors")
    b.ts("Errors", [q(f"sum by (service, kind) (rate(rlrt_errors_total{{{R}}}[5m]))", "{{service}} {{kind}}")],
         unit="ops", min0=True)
    b.ts("Dead letters", [q(f"max(rlrt_bus_dead_letter_messages{{{R}}})", "held in dead stream"),
                          q(f"sum by (reason) (increase(rlrt_dead_lettered_messages_total{{{R}}}[5m]))",
                            "new (5m): {{reason}}")], min0=True)
    b.ts("Redelivered (claimed)", [q(f"sum by (stream) (increase(rlrt_bus_claimed_messages_total{{{R}}}[5m]))",
                                     "{{stream}}")], min0=True,
         desc="Entries taken over from idle consumers: a worker died or stalled.")
    b.ts("Verifier outcomes", [q(f"sum by (outcome) (rate(rlrt_verifier_rewards_total{{{R}}}[5m]))", "{{outcome}}"),
                               q(f"sum(rate(rlrt_verifier_timeouts_total{{{R}}}[5m]))", "timeouts")],
         unit="ops", min0=True)
    b.ts("Teacher skipped", [q(f"sum by (reason) (rate(rlrt_teacher_skipped_total{{{R}}}[5m]))", "{{reason}}")],
         unit="ops", min0=True)
    b.ts("Non-finite steps skipped", [q(f"sum(increase(rlrt_learner_skipped_nonfinite_steps_total{{{R}}}[5m]))",
                                        "5m")], min0=True)

    return {
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "description": "rlrt: asynchronous RLVR training with RLRT (metrics in docs/metrics.md)",
        "editable": True,
        "graphTooltip": 1,
        "links": [],
        "panels": b.panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["rlrt"],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
            {"name": "run", "label": "Run", "type": "query", "datasource": DS,
             "query": {"query": "label_values(rlrt_build_info, run)", "refId": "run"},
             "definition": "label_values(rlrt_build_info, run)", "includeAll": True, "multi": True,
             "allValue": ".*", "current": {}, "hide": 0, "refresh": 2, "sort": 1, "options": [], "regex": ""},
        ]},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "rlrt",
        "uid": "rlrt-main",
        "version": 1,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the JSON on disk differs")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
