"""Every query of the Grafana dashboard answers from a live run, through a real Prometheus.

A tiny run (tests/test_e2e.py's set-up: the four services as real processes over the real
Redis, services.launcher.LocalRun, plus one weight relay the workers pull through, so the
relay panels have series) is scraped every second by Debian's `prometheus`, whose
static targets come from the run's own service registrations (services/*.json). Once the
learner has trained a few steps, every PromQL expression of deploy/grafana/dashboards/rlrt.json
is sent to /api/v1/query with `$run` set to the run: each must return at least one series,
except the few listed in MAY_BE_EMPTY with the reason a short clean run leaves them empty.
`promtool check config` checks the shipped compose Prometheus configuration (and the
Kubernetes one when the promtool build has the Kubernetes service discovery, which Debian's
does not). No alerting or
recording rules are shipped (deploy/prometheus has none), so there is no rule file to check.
Needs the `prometheus` and `promtool` binaries (`make test-deploy` installs Debian's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from prometheus_server import PrometheusServer
from rlrt_core.config import load_config
from rlrt_core.transport.streams import StreamBus
from services.launcher import LocalRun, read_metrics, service_endpoints

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "rlrt.json"
REDIS_URL = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/0")
SERVICES = {"learner", "rollout", "verifier", "teacher", "relay"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("prometheus") and shutil.which("promtool")),
                       reason="needs Debian's prometheus and promtool (`make test-deploy` installs them)"),
]

# (panel title, query legend) -> why a short, clean run can leave that query with no series.
MAY_BE_EMPTY: dict[tuple[str, str], str] = {
    ("Errors", "{{service}} {{kind}}"):
        "rlrt_errors_total{kind} gets a child only when an error of that kind happens; a clean run has none",
    ("Dead letters", "new (5m): {{reason}}"):
        "rlrt_dead_lettered_messages_total{reason} gets a child only when an entry is dead-lettered",
    ("Redelivered (claimed)", "{{stream}}"):
        "rlrt_bus_claimed_messages_total{stream} moves only when a consumer died holding entries; none dies here "
        "(the compose test kills a rollout worker)",
    ("Teacher skipped", "{{reason}}"):
        "rlrt_teacher_skipped_total{reason} gets a child only when the teacher skips a rollout",
}


def dashboard_queries(path: Path = DASHBOARD) -> Iterator[tuple[str, str, str]]:
    """(panel title, legend, PromQL) for every query of every panel, rows included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    yield p.get("title", "?"), t.get("legendFormat", ""), t["expr"]
            yield from walk(p.get("panels", []))
    yield from walk(json.loads(path.read_text())["panels"])


def _promtool_check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=180)


def _promtool_has_kubernetes_sd(tmp_path: Path) -> bool:
    """Debian builds prometheus without the Kubernetes service discovery."""
    probe = tmp_path / "k8s-sd-probe.yml"
    probe.write_text(yaml.safe_dump({"scrape_configs": [{"job_name": "p", "kubernetes_sd_configs": [{"role": "pod"}]}]}))
    return _promtool_check_config(probe).returncode == 0


def test_promtool_accepts_the_shipped_configs(tmp_path: Path):
    shipped = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    r = _promtool_check_config(shipped)
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr
    if _promtool_has_kubernetes_sd(tmp_path):
        r = _promtool_check_config(ROOT / "deploy" / "prometheus" / "prometheus-k8s.yml")
        assert r.returncode == 0, r.stdout + r.stderr
    # promtool really checks: a broken config is refused
    broken = yaml.safe_load(shipped.read_text())
    broken["scrape_configs"][0]["scrape_interval"] = "fortnightly"
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(broken))
    assert _promtool_check_config(bad).returncode != 0


def test_may_be_empty_names_real_queries():
    known = {(title, legend) for title, legend, _ in dashboard_queries()}
    assert set(MAY_BE_EMPTY) <= known, sorted(set(MAY_BE_EMPTY) - known)


def test_every_dashboard_query_answers_from_a_live_run(tmp_path: Path):
    run_name = f"prom-{uuid.uuid4().hex[:8]}"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", use_env=False, overrides={
        "run_name": run_name, "metrics": {"run_dir": str(tmp_path / run_name)},
        # more steps than the test waits for: the learner must still be up (and scraped) when
        # the queries run, or its gauges would be marked stale
        "transport": {"redis_url": REDIS_URL, "weights_port": 0},
        "learner": {"total_steps": 200, "checkpoint_every": 2}, "launcher": {"relays": 1}})
    queries = list(dashboard_queries())
    assert len(queries) > 40
    answered: dict[tuple[str, str], int] = {}
    run = LocalRun(cfg, n_rollout=1, restart_crashed=False)
    try:
        with run:
            deadline = time.time() + 240
            while time.time() < deadline and {e["service"] for e in service_endpoints(run.run_dir)} != SERVICES:
                assert run.learner().alive(), (run.run_dir / "logs" / "learner-0.log").read_text()[-3000:]
                time.sleep(0.5)
            eps = service_endpoints(run.run_dir)
            assert {e["service"] for e in eps} == SERVICES, eps
            prom_cfg = tmp_path / "prometheus.yml"
            prom_cfg.write_text(yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "rlrt", "static_configs": [
                    {"targets": [f"{e['host']}:{e['admin_port']}"], "labels": {"worker": e["worker"]}}
                    for e in eps]}]}))
            with PrometheusServer(prom_cfg, tmp_path / "prom") as prom:
                # a few trained steps, then enough scrapes after them for every rate() window
                while time.time() < deadline and len(read_metrics(run.run_dir)) < 4:
                    assert run.learner().alive(), (run.run_dir / "logs" / "learner-0.log").read_text()[-3000:]
                    time.sleep(0.5)
                assert len(read_metrics(run.run_dir)) >= 4, "the run trained fewer than 4 steps in time"
                time.sleep(5)
                targets = prom.targets()
                assert len(targets) == len(eps) and all(t["health"] == "up" for t in targets), targets
                for title, legend, expr in queries:
                    result = prom.query(expr.replace("$run", run_name))
                    answered[(title, legend)] = len(result)
    finally:
        StreamBus.from_url(REDIS_URL, run_name).delete_run()
    empty = sorted(k for k, n in answered.items() if n == 0 and k not in MAY_BE_EMPTY)
    assert not empty, f"dashboard queries that returned no series from a live run: {empty}"
    # the per-service replica panel sees every service of the run
    assert answered[("Replicas reporting", "{{service}}")] == len(SERVICES)
