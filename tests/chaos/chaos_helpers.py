"""Helpers of the chaos suite: a private Redis per test (never the shared one), runs of the
tiny recipe as real processes, fault injection at deterministic points (`rlrt_core.failpoints`)
and the accounting checks every test ends with."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import redis

from rlrt_core.config import load_config
from services.launcher import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    from rlrt_core.transport.embedded import redis_server_binary

    return redis_server_binary()


class PrivateRedis:
    """A redis-server of this test alone, on a unix socket (no port to race for), without
    persistence unless asked: a kill loses everything, the worst case for the pipeline."""

    def __init__(self, appendonly: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rlrt-chaos-"))
        self.sock = self.dir / "r.sock"
        self.url = f"unix://{self.sock}?db=0"
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        args = [redis_binary(), "--port", "0", "--unixsocket", str(self.sock), "--unixsocketperm", "700",
                "--dir", str(self.dir), "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                c = redis.Redis.from_url(self.url, socket_timeout=1)
                if c.ping():
                    c.close()
                    return
            except (redis.ConnectionError, OSError):
                time.sleep(0.05)
        raise RuntimeError("private redis did not start")

    def kill(self) -> None:
        """kill -9: no shutdown, no save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self, after_s: float = 3.0) -> None:
        self.kill()
        time.sleep(after_s)
        if self.sock.exists():
            self.sock.unlink()
        self.start()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def chaos_cfg(tmp_path: Path, redis_url: str, **over):
    run = f"chaos-{uuid.uuid4().hex[:8]}"
    base = {"run_name": run, "metrics": {"run_dir": str(tmp_path / run), "bus_stats_every_s": 1.0},
            "transport": {"redis_url": redis_url, "claim_idle_ms": 3000, "weights_port": 0},
            "learner": {"total_steps": 6, "checkpoint_every": 2}}
    for section, values in over.items():
        base.setdefault(section, {}).update(values)
    return load_config(ROOT / "configs" / "tiny.yaml", overrides=base, use_env=False)


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def failpoint_env(tmp_path: Path, spec: str) -> tuple[dict[str, str], Path]:
    d = tmp_path / "failpoints"
    d.mkdir(exist_ok=True)
    return {"RLRT_FAILPOINTS": spec, "RLRT_FAILPOINT_DIR": str(d), "RLRT_FAILPOINT_TIMEOUT_S": "120"}, d


def final_state(run_dir: Path) -> dict:
    ck = run_dir / "checkpoints"
    return json.loads((ck / (ck / "latest").read_text().strip() / "state.json").read_text())


def check_accounting(cfg, run_dir: Path, *, expect_steps: int | None = None) -> dict:
    """The ledger identity (every dispatched group trained, dropped stale, dead-lettered or
    still outstanding), no group trained twice, metrics rows one per step."""
    state = final_state(run_dir)
    ledger = state["extra"]["ledger"]
    c = ledger["counts"]
    assert c["dispatched"] == c["trained"] + c["dropped_stale"] + c["dead"] + len(ledger["outstanding"]), c
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    n = expect_steps or cfg.learner.total_steps
    assert steps == list(range(1, n + 1)), steps
    trained = [g for r in rows for g in r["groups"]]
    assert len(trained) == len(set(trained)), "a group was trained twice"
    assert len(trained) == c["trained"] == n * cfg.learner.groups_per_step
    return state


def log_of(run_dir: Path, worker: str) -> str:
    p = run_dir / "logs" / f"{worker}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def tail_logs(run_dir: Path, n: int = 3000) -> str:
    out = []
    for p in sorted((run_dir / "logs").glob("*.log")):
        out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}")
    return "\n".join(out)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
