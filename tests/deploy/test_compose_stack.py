"""docker compose up of the real stack, checked through its real endpoints.

Builds (or reuses) the CPU image `rlrt:cpu` and starts docker-compose.yml — Redis with a
password and an append-only file, learner, two rollout replicas (`--scale rollout=2`),
verifier, teacher on the tiny recipe, the weight relay (profile `relay`; the workers pull
through it), Prometheus — with `docker compose up --wait`, plus
tests/deploy/compose.test.yml (tiny recipe, ephemeral loopback ports, 5 s health checks).
Then, over HTTP from the host: every rlrt container healthy, /healthz and /readyz answer
200, the run trains its steps, both rollout replicas generated groups, Prometheus
scraped every replica and the relay (its own job), whose egress it recorded; a rollout container killed mid-run (SIGKILL of its init process,
as the OOM killer or a crash would) is restarted by its restart policy and nothing is lost
(every dispatched group trained, dropped as stale, or still in the pipeline; nothing
dead-lettered, nothing trained twice); `docker compose down` leaves no container, network
or volume behind.

Engine: the one at DOCKER_HOST or /var/run/docker.sock, else a private dockerd
(scripts/deploy/dockerd.sh). Images that no registry supplies are built locally
(scripts/deploy/base_image.sh, build_image.sh). The test skips only when no container
engine can run at all. `make test-deploy` installs docker.io, prometheus and compose first.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from rlrt_core.transport.streams import StreamBus

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "deploy"
OVERRIDE = Path(__file__).with_name("compose.test.yml")
RLRT_SERVICES = ("learner", "rollout", "verifier", "teacher")
STEPS = int(os.environ.get("RLRT_TEST_STEPS", "16"))
GROUPS_PER_STEP = 4  # configs/tiny.yaml learner.groups_per_step


def _run(cmd: list[str], env: dict[str, str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def engine() -> Iterator[dict[str, str]]:
    """Environment whose DOCKER_HOST reaches a running engine (started privately if needed)."""
    r = subprocess.run(["bash", str(SCRIPTS / "dockerd.sh"), "start"], capture_output=True, text=True, timeout=120)
    if r.returncode == 3:
        pytest.skip(f"no container engine can run here: {r.stderr.strip()[-500:]}")
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, DOCKER_HOST=r.stdout.strip().split("=", 1)[1])
    started_here = "private dockerd" in r.stderr
    assert _run(["docker", "compose", "version"], env, 30, check=False).returncode == 0, \
        "the Compose v2 plugin is missing: run scripts/deploy/install.sh"
    _remove_stale_projects(env)
    yield env
    if started_here:
        subprocess.run(["bash", str(SCRIPTS / "dockerd.sh"), "stop"], timeout=180)


def _remove_stale_projects(env: dict[str, str]) -> None:
    """Containers, networks and volumes of earlier test projects that were interrupted
    (their restart policy would otherwise bring them back with the daemon)."""
    for ident, ls, rm in (("ID", ["ps", "-a"], ["rm", "-f", "-v"]), ("ID", ["network", "ls"], ["network", "rm"]),
                          ("Name", ["volume", "ls"], ["volume", "rm", "-f"])):
        fmt = f'{{{{.{ident}}}}} {{{{.Label "com.docker.compose.project"}}}}'
        out = _run(["docker", *ls, "--filter", "label=com.docker.compose.project", "--format", fmt], env, 120).stdout
        stale = [line.split()[0] for line in out.splitlines() if line.split()[1:2] and
                 line.split()[1].startswith("rlrt-test-")]
        if stale:
            _run(["docker", *rm, *stale], env, 300, check=False)


def _image_or_pull(env: dict[str, str], image: str) -> bool:
    if _run(["docker", "image", "inspect", image], env, 30, check=False).returncode == 0:
        return True
    return _run(["timeout", "120", "docker", "pull", "-q", image], env, 150, check=False).returncode == 0


@pytest.fixture(scope="module")
def images(engine: dict[str, str]) -> dict[str, str]:
    """RLRT_IMAGE, REDIS_IMAGE, PROMETHEUS_IMAGE: pulled where a registry answers, else built here."""
    t0 = time.time()
    env = dict(engine, PYTHON=sys.executable)
    _run(["bash", str(SCRIPTS / "build_image.sh"), "rlrt:cpu"], env, 3000)
    out = {"RLRT_IMAGE": "rlrt:cpu", "REDIS_IMAGE": "redis:7.4-alpine", "PROMETHEUS_IMAGE": "prom/prometheus:v3.5.0"}
    if not (_image_or_pull(engine, out["REDIS_IMAGE"]) and _image_or_pull(engine, out["PROMETHEUS_IMAGE"])):
        _run(["bash", str(SCRIPTS / "base_image.sh")], engine, 1800)
        out["REDIS_IMAGE"] = out["PROMETHEUS_IMAGE"] = "rlrt-infra:bookworm"
    print(f"\nimages ready in {time.time() - t0:.0f}s: {out}")
    return out


class Stack:
    def __init__(self, env: dict[str, str], project: str) -> None:
        self.env = env
        self.project = project

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["docker", "compose", "-p", self.project, "-f", str(ROOT / "docker-compose.yml"),
                     "-f", str(OVERRIDE), *args], self.env, timeout, check)

    def docker(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["docker", *args], self.env, timeout, check)

    def containers(self) -> list[dict[str, Any]]:
        out = self.compose("ps", "-a", "--format", "json").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def inspect(self, name: str) -> dict[str, Any]:
        return json.loads(self.docker("inspect", name).stdout)[0]

    def host_port(self, name: str, port: int) -> int:
        ports = self.inspect(name)["NetworkSettings"]["Ports"][f"{port}/tcp"]
        return int(next(p["HostPort"] for p in ports if p["HostIp"] == "127.0.0.1"))

    def url(self, name: str, port: int = 8000) -> str:
        return f"http://127.0.0.1:{self.host_port(name, port)}"

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {kind: self.docker(*cmd, "--filter", label, "-q").stdout.split()
                for kind, cmd in (("containers", ["ps", "-a"]), ("networks", ["network", "ls"]),
                                  ("volumes", ["volume", "ls"]))}

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40", check=False).stdout[-12000:]


def _get(url: str, patience_s: float = 120) -> httpx.Response:
    """GET that rides out a busy service: the admin app shares its process with the main
    loop, and on a loaded 2-core host an answer can take longer than a few seconds."""
    deadline = time.time() + patience_s
    while True:
        try:
            return httpx.get(url, timeout=30)
        except httpx.TransportError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def _prom(url: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=60).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _metric(text: str, name: str) -> float:
    """Sum of every sample of `name` in a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


# the image fixture builds everything on a cold cache (debootstrap, torch layers): the
# project-wide 900 s per-test limit is too short for that on a loaded 2-core machine
@pytest.mark.timeout(5400)
def test_compose_stack_trains_scales_survives_a_killed_worker_and_cleans_up(engine, images, tmp_path):
    project = f"rlrt-test-{secrets.token_hex(3)}"
    password = secrets.token_hex(12)
    env = dict(engine, **images, REDIS_PASSWORD=password, RLRT_WEIGHTS_TOKEN=secrets.token_hex(12),
               GRAFANA_ADMIN_PASSWORD=secrets.token_hex(8), RLRT_CONFIG="./configs/tiny.yaml",
               RLRT_RUN_NAME=project, RLRT_TEST_STEPS=str(STEPS),
               # every compose call (up, ps, down) sees the optional relay; the workers use it
               COMPOSE_PROFILES="relay", RLRT_WEIGHTS_RELAY="auto")
    stack = Stack(env, project)
    t0 = time.time()
    try:
        stack.compose("up", "-d", "--wait", "--no-build", "--pull", "never", "--scale", "rollout=2",
                      "redis", *RLRT_SERVICES, "relay", "prometheus", timeout=900)
        t_up = time.time() - t0
        by_service: dict[str, list[dict[str, Any]]] = {}
        for c in stack.containers():
            by_service.setdefault(c["Service"], []).append(c)
        assert sorted((s, len(cs)) for s, cs in by_service.items()) == sorted(
            [("redis", 1), ("learner", 1), ("rollout", 2), ("verifier", 1), ("teacher", 1), ("relay", 1),
             ("prometheus", 1)])
        rlrt = {c["Name"]: c["Service"] for s in RLRT_SERVICES for c in by_service[s]}
        relay = by_service["relay"][0]["Name"]
        for name, service in [*rlrt.items(), (relay, "relay")]:
            # `up --wait` saw each healthy; a check can still time out once on a loaded host
            deadline = time.time() + 180
            while stack.inspect(name)["State"]["Health"]["Status"] != "healthy" and time.time() < deadline:
                time.sleep(2)
            state = stack.inspect(name)["State"]
            assert state["Health"]["Status"] == "healthy", (name, state["Health"]["Log"][-3:])
            base = stack.url(name)
            assert _get(f"{base}/healthz").status_code == 200
            deadline = time.time() + 180
            while _get(f"{base}/readyz").status_code != 200 and time.time() < deadline:
                time.sleep(1)
            ready = _get(f"{base}/readyz")
            assert ready.status_code == 200, ready.text
            assert _get(f"{base}/status").json()["service"] == service

        # kill one rollout replica while it holds work, as a crash would: SIGKILL of the
        # container's init process from outside. (`docker kill` counts as a manual stop:
        # Docker applies no restart policy after it.)
        learner = next(n for n, s in rlrt.items() if s == "learner")
        victim = sorted(n for n, s in rlrt.items() if s == "rollout")[-1]
        deadline = time.time() + 600
        while time.time() < deadline:
            text = _get(f"{stack.url(victim)}/metrics").text
            if _metric(text, "rlrt_rollout_groups_total") > 0:
                break
            time.sleep(1)
        else:
            pytest.fail(f"{victim} generated nothing in 10 minutes\n{stack.logs()}")
        step_at_kill = _metric(_get(f"{stack.url(learner)}/metrics").text, "rlrt_learner_step")
        assert step_at_kill < STEPS - 2, "the run nearly finished before the kill: raise RLRT_TEST_STEPS"
        os.kill(stack.inspect(victim)["State"]["Pid"], signal.SIGKILL)
        deadline = time.time() + 900  # a restarted worker imports torch again: slow on a loaded host
        while time.time() < deadline:
            st = stack.inspect(victim)
            if st["RestartCount"] >= 1 and st["State"]["Status"] == "running" \
                    and st["State"].get("Health", {}).get("Status") == "healthy":
                break
            time.sleep(1)
        else:
            pytest.fail(f"{victim} was not restarted: {stack.inspect(victim)['State']}\n{stack.logs()}")

        # the learner exits 0 once it has trained STEPS steps (restart: on-failure keeps it down)
        deadline = time.time() + 900
        while stack.inspect(learner)["State"]["Status"] != "exited" and time.time() < deadline:
            time.sleep(2)
        state = stack.inspect(learner)["State"]
        assert state["Status"] == "exited" and state["ExitCode"] == 0, (state, stack.logs())

        # Prometheus (dns_sd_configs on the service names) scraped every replica, and both
        # rollout replicas generated groups
        prom = stack.url(next(c["Name"] for c in by_service["prometheus"]), 9090)
        deadline = time.time() + 60
        while time.time() < deadline:
            scraped = _prom(prom, 'max by (instance, compose_service) (max_over_time(up{job="rlrt"}[30m]))')
            if len(scraped) >= len(rlrt):
                break
            time.sleep(3)
        assert sorted(r["metric"]["compose_service"] for r in scraped) == sorted(rlrt.values()), scraped
        assert all(float(r["value"][1]) == 1 for r in scraped), scraped
        # the relay: scraped by its own job, its egress recorded (the workers pulled through it)
        up = _prom(prom, 'max by (compose_service) (max_over_time(up{job="rlrt-relay"}[30m]))')
        assert [(r["metric"]["compose_service"], float(r["value"][1])) for r in up] == [("relay", 1.0)], up
        sent = _prom(prom, f'max(max_over_time(rlrt_relay_sent_bytes_total{{run="{project}"}}[30m]))')
        assert sent and float(sent[0]["value"][1]) > 0, sent
        relay_status = _get(f"{stack.url(relay)}/status").json()
        assert relay_status["counters"]["pulls_full"] + relay_status["counters"]["pulls_delta"] >= 1, relay_status
        # the worker label is rollout-<host name>-<pid>: a restarted container keeps its host
        # name (its container id) and gets a new pid, so group by the host name
        work = _prom(prom, 'max by (host) (label_replace(max_over_time(rlrt_rollout_groups_total'
                           f'{{run="{project}"}}[30m]), "host", "$1", "worker", "rollout-(.+)-[0-9]+"))')
        hosts = {stack.inspect(n)["Config"]["Hostname"] for n, s in rlrt.items() if s == "rollout"}
        assert {r["metric"]["host"] for r in work} == hosts, (work, hosts)
        assert all(float(r["value"][1]) > 0 for r in work), work

        # accounting, from the learner's last checkpoint and the compose Redis
        ck = tmp_path / "checkpoints"
        stack.docker("cp", f"{learner}:/var/lib/rlrt/run/checkpoints", str(ck))
        latest = (ck / "latest").read_text().strip()
        final = json.loads((ck / latest / "state.json").read_text())
        assert final["step"] == STEPS
        totals = final["extra"]["totals"]
        redis_port = stack.host_port(next(c["Name"] for c in by_service["redis"]), 6379)
        bus = StreamBus.from_url(f"redis://:{password}@127.0.0.1:{redis_port}/0", project)
        try:
            assert bus.client.xlen(bus.key("dead")) == 0, [d.reason for d in bus.dead_letters()]
            assert totals.get("duplicates", 0) == 0
            assert totals["trained_groups"] == STEPS * GROUPS_PER_STEP
            done = bus.client.scard(bus.done_key("learner"))
            assert done == totals["trained_groups"] + totals.get("dropped_stale", 0)
            dispatched = bus.client.xinfo_stream(bus.key("prompts"))["entries-added"]
            assert dispatched == done + bus.backlog()
        finally:
            bus.client.close()
        print(f"\ncompose up --wait {t_up:.0f}s, whole run {time.time() - t0:.0f}s")

        stack.compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout=300)
        assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
    finally:
        if any(stack.leftovers().values()):
            stack.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300, check=False)
