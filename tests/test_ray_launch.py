"""`rlrt launch --ray` (services/ray_launcher.py) on a local Ray cluster with the tiny model:
the services run as Ray actors over the real Redis and gRPC, the learner's versions advance,
it exits 0, and Ray restarts a killed rollout service and a killed learner (which resumes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from rlrt_core.config import load_config
from services.launcher import read_metrics
from services.ray_launcher import RayRun

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/0")


def _cfg(tmp_path: Path, steps: int, **learner):
    run = f"ray-{uuid.uuid4().hex[:8]}"
    over = {"run_name": run, "metrics": {"run_dir": str(tmp_path / run)},
            "transport": {"redis_url": REDIS_URL, "claim_idle_ms": 3000, "weights_port": 0},
            "learner": {"total_steps": steps, "checkpoint_every": 2, **learner},
            "ray": {"rollout_workers": 2, "max_restarts": 2, "rollout": {"num_cpus": 0.5}}}
    return load_config(ROOT / "configs" / "tiny.yaml", overrides=over, use_env=False)


def _kill_services(run: RayRun, done: threading.Event, killed: list[str]) -> None:
    """SIGKILL rollout-0's service once the learner trained a step, then the learner's service
    once its step-2 checkpoint exists (the run has 6 steps, so it is still training)."""
    import ray

    metrics = run.run_dir / "metrics.jsonl"
    ck2 = run.run_dir / "checkpoints" / "step_000002" / "state.json"
    plan = [("rollout-0", lambda: metrics.is_file() and metrics.read_text().strip()),
            ("learner-0", ck2.is_file)]
    for worker, ready in plan:
        while not done.is_set() and not ready():
            time.sleep(0.2)
        if done.is_set():
            return
        pid = ray.get(run.actors[worker].info.remote(), timeout=30)["pid"]
        os.kill(pid, signal.SIGKILL)
        killed.append(worker)


def test_ray_launch_trains_and_restarts_killed_services(tmp_path):
    # The learner service runs DeepSpeed ZeRO-2 here: its publish, checkpoint and resume hooks.
    cfg = _cfg(tmp_path, steps=6, deepspeed={"zero_optimization": {"stage": 2}})
    run = RayRun(cfg)
    done = threading.Event()
    killed: list[str] = []
    try:
        run.start()
        assert set(run.actors) == {"learner-0", "teacher-0", "verifier-0", "rollout-0", "rollout-1"}
        killer = threading.Thread(target=_kill_services, args=(run, done, killed), daemon=True)
        killer.start()
        rc = run.wait(timeout_s=400)
        import ray

        service_pids = [i["pid"] for i in ray.get([a.info.remote() for a in run.actors.values()], timeout=30)]
    finally:
        done.set()
        run.stop()
    logs = run.run_dir / "logs"
    assert rc == 0, (logs / "learner-0.log").read_text()[-3000:]
    assert killed == ["rollout-0", "learner-0"]
    rows = read_metrics(run.run_dir)
    assert rows[-1]["step"] == 6
    versions = [r["version"] for r in rows]
    assert versions == sorted(set(versions)), f"weight versions only move forward: {versions}"
    for worker in killed:  # Ray restarted each killed service's actor once
        text = (logs / f"{worker}.log").read_text()
        assert "exited with -9; ending the actor" in text, worker
        assert text.count(f"[ray] {worker} on") == 2, worker
    assert "resumed from" in (logs / "learner-0.log").read_text()
    # no port is picked for the learner: it binds one itself and announces it with each version
    effective = (run.run_dir / "config.yaml").read_text()
    assert "weights_port: 0\n" in effective and "weights_target: null" in effective
    assert "weight server listening on 127.0.0.1:" in (logs / "learner-0.log").read_text()
    ck = run.run_dir / "checkpoints" / "step_000006"
    # ZeRO: every rank's optimizer shard (fp32 master weights and Adam moments) in safetensors
    assert (ck / "model.safetensors").is_file() and (ck / "zero_rank000_of_001.safetensors").is_file()
    assert "DeepSpeed" in (logs / "learner-0.log").read_text()
    for pid in service_pids:  # stop() ended every service process
        deadline = time.time() + 10
        while Path(f"/proc/{pid}").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{pid}").exists(), pid


def test_cli_launch_without_ray_flag_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "services.cli.main", "launch", "--config",
                           str(ROOT / "configs" / "tiny.yaml")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "needs --ray" in proc.stdout + proc.stderr


def test_multi_node_needs_reachable_redis(tmp_path):
    cfg = _cfg(tmp_path, steps=1)
    run = RayRun(cfg)
    with pytest.raises(ValueError, match="loopback"):
        run._redis_url(multi_node=True)
    cfg.transport.redis_url = "unix:///tmp/redis.sock?db=0"
    with pytest.raises(ValueError, match="unix socket"):
        RayRun(cfg)._redis_url(multi_node=True)
    cfg.transport.redis_url = None
    with pytest.raises(ValueError, match="several nodes"):
        RayRun(cfg)._redis_url(multi_node=True)


def test_ray_relay_per_node_serves_the_workers_of_its_node(tmp_path):
    """`ray.relay_per_node`: one relay actor pinned to the (single) node, registered under this
    host's name; the workers switch to it and pull through it."""
    import socket

    import redis

    from rlrt_core.weights.relay import live_relays

    cfg = _cfg(tmp_path, steps=3)
    cfg.ray.relay_per_node = True
    cfg.ray.rollout_workers = 1
    run = RayRun(cfg)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        run.start()
        assert set(run.actors) == {"learner-0", "teacher-0", "verifier-0", "rollout-0", "relay-0"}
        rc = run.wait(timeout_s=400)
        relays = live_relays(client, cfg.run_name)  # still up: stop() ends them
    finally:
        run.stop()
        keys = list(client.scan_iter(match=f"rlrt:{cfg.run_name}:*"))
        if keys:
            client.delete(*keys)
        client.close()
    logs = run.run_dir / "logs"
    assert rc == 0, (logs / "learner-0.log").read_text()[-3000:]
    effective = load_config(run.run_dir / "config.yaml", use_env=False)
    assert effective.transport.weights_relay == "auto" and effective.relay.port == 0
    [rel] = relays
    assert rel.relay_id == "relay-0" and rel.node == socket.gethostname() and rel.address.startswith("127.0.0.1:")
    assert rel.versions and rel.pulled_bytes > 0
    # Workers took versions from it. Not "more out than in": a worker skips versions it is not
    # yet due for (it takes the newest when it loads), so under load the relay may pull
    # versions nobody asks it for (a clean-clone CI run saw 146 MB out, 182 MB in).
    assert rel.bytes_sent > 0


def test_local_ray_start_that_timed_out_is_retried_and_its_processes_killed(monkeypatch):
    """Ray gives its raylet a fixed 30 s to register; a start that times out on a loaded box
    leaves its GCS and raylet running. The launcher kills what the failed attempt started and
    starts a real local cluster again."""
    import ray

    from services import ray_launcher

    real_init = ray.init
    started: list[subprocess.Popen] = []

    def first_attempt_times_out(*args, **kw):
        if not started:
            # Stands for the GCS/raylet a timed-out start leaves behind: a real child process.
            started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
            raise Exception("The current node timed out during startup. This could happen because "
                            "some of the raylet failed to startup or the GCS has become overloaded.")
        return real_init(*args, **kw)

    monkeypatch.setattr(ray, "init", first_attempt_times_out)
    assert not ray.is_initialized()
    try:
        ray_launcher._init_local_ray(2, {"include_dashboard": False, "log_to_driver": False})
        assert ray.is_initialized()
        assert ray.cluster_resources()["CPU"] == 2
        assert started[0].wait(timeout=10) == -signal.SIGKILL
    finally:
        ray.shutdown()
        if started and started[0].poll() is None:
            started[0].kill()


def test_local_ray_start_fails_on_other_errors_without_retry(monkeypatch):
    import ray

    from services import ray_launcher

    calls = []

    def bad(*args, **kw):
        calls.append(1)
        raise ValueError("num_cpus must be positive")

    monkeypatch.setattr(ray, "init", bad)
    with pytest.raises(ValueError, match="num_cpus"):
        ray_launcher._init_local_ray(0, {})
    assert calls == [1]


def test_descendants_finds_grandchildren():
    from services.ray_launcher import _descendants

    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
                              "'import time; time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        assert {child.pid, grandchild} <= _descendants(os.getpid())
        assert grandchild in _descendants(child.pid) and child.pid not in _descendants(child.pid)
    finally:
        os.kill(grandchild, signal.SIGKILL)
        child.kill()
        child.wait()
