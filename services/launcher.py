"""Local process launcher behind `rlrt demo` / `rlrt train`: one machine, every service a
real OS process, the same data path (Redis Streams + gRPC) as compose/Kubernetes.

It starts an embedded Redis when no `REDIS_URL` is set, writes the effective config (and
the plan of expected workers, `plan.json`) into the run directory, spawns learner, verifier,
teacher and N rollout workers (and `launcher.relays` weight relays), restarts a crashed worker
up to `launcher.max_restarts` times (never the learner: its exit ends the run), shows a live view, and on Ctrl-C / SIGTERM stops
everything (SIGTERM, then SIGKILL after a grace period). A worker that used up its restarts is
reported loudly and, with `launcher.on_exhausted: stop` (the default), ends the run with exit
code `EXIT_WORKER_EXHAUSTED` instead of leaving it to hang without that stage.

Ports: the launcher picks none. The learner's weight server binds a free port itself and
announces its address on Redis, and every admin server does the same, so several runs on
one machine never race for a port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlrt_core.config import RunConfig, dump_config
from rlrt_core.stages import SERVICES

EXIT_WORKER_EXHAUSTED = 3


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (for tools such as torchrun's rendezvous that need a number
    up front; servers of rlrt bind port 0 themselves instead)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: SIGTERM the service when the launcher dies, even by SIGKILL (no orphans)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    service: str
    worker: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    log_fh: Any = None

    def start(self) -> None:
        self.log_fh = open(self.log_path, "ab", buffering=0)
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log_fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return

    def close(self) -> None:
        if self.log_fh is not None:
            self.log_fh.close()
            self.log_fh = None


@dataclass
class LocalRun:
    """Run every service locally for `cfg`; `run()` blocks until the learner finishes."""

    cfg: RunConfig
    config_path: Path | None = None
    n_rollout: int = 1
    restart_crashed: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    on_event: Callable[[str], None] | None = None  # called with launcher messages (e.g. the console)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.cfg.metrics.run_dir).resolve()
        self._embedded = None
        self._stopping = False
        self.failure: str | None = None  # why the launcher ended the run, when it did

    # -- set-up ------------------------------------------------------------------------
    def _redis_url(self) -> str:
        if self.cfg.transport.redis_url:
            return self.cfg.transport.redis_url
        from rlrt_core.transport.embedded import EmbeddedRedis

        self._embedded = EmbeddedRedis(self.run_dir / "redis")
        return self._embedded.start()

    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        (self.run_dir / "services").mkdir(exist_ok=True)
        redis_url = self._redis_url()
        cfg = self.cfg.model_copy(deep=True)
        cfg.transport.redis_url = redis_url
        # The learner binds a free port and announces it; workers dial what it announced.
        cfg.transport.weights_port = 0
        cfg.transport.weights_target = None
        cfg.metrics.run_dir = str(self.run_dir)
        if cfg.launcher.relays:
            cfg.transport.weights_relay = "auto"  # the relays started below serve the workers
        if not cfg.transport.weights_token and not cfg.transport.weights_token_file:
            from rlrt_core.weights.records import ensure_token_file

            # One random shared secret for the learner's weight service and its clients.
            token_file = self.run_dir / "weights.token"
            ensure_token_file(token_file)
            cfg.transport.weights_token_file = str(token_file)
        self.cfg = cfg
        cfg_file = self.run_dir / "config.yaml"
        cfg_file.write_text(dump_config(cfg))
        env = dict(os.environ)
        # Children read everything from the effective config file; drop overrides that
        # would fight it, keep the rest (e.g. RLRT_CACHE_DIR, HF_HUB_OFFLINE).
        for k in list(env):
            if k.startswith("RLRT__") or k == "REDIS_URL":
                env.pop(k)
        env.update(self.extra_env)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Several torch processes share the cores: one thread each avoids oversubscription,
        # except where launcher.threads gives a service more.
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"

        def env_of(service: str) -> dict[str, str]:
            n = cfg.launcher.threads.get(service)
            return env if n is None else dict(env, OMP_NUM_THREADS=str(n))

        py = sys.executable
        plan = [("learner", "learner-0"), ("verifier", "verifier-0"), ("teacher", "teacher-0")]
        plan += [("rollout", f"rollout-{i}") for i in range(self.n_rollout)]
        for service, worker in plan:
            cmd = [py, "-m", "services.cli.main", "serve", service, "--config", str(cfg_file), "--worker", worker]
            self.children.append(Child(service, worker, cmd, env_of(service), self.run_dir / "logs" / f"{worker}.log"))
        (self.run_dir / "plan.json").write_text(json.dumps([{"service": s, "worker": w} for s, w in plan]))
        # Relays are not pipeline stages: supervised and restarted like workers, left out of
        # plan.json (a run without them is complete); they announce their admin app like the rest.
        for i in range(cfg.launcher.relays):
            worker = f"relay-{i}"
            cmd = [py, "-m", "services.cli.main", "serve", "relay", "--config", str(cfg_file), "--worker", worker]
            self.children.append(Child("relay", worker, cmd, env_of("relay"), self.run_dir / "logs" / f"{worker}.log"))

    # -- running -----------------------------------------------------------------------
    def start(self) -> None:
        if not self.children:
            self.prepare()
        for c in self.children:
            c.start()

    def learner(self) -> Child:
        return next(c for c in self.children if c.service == "learner")

    def _event(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)
        else:
            print(f"[launcher] {message}", file=sys.stderr, flush=True)

    def supervise_once(self) -> None:
        """Restart crashed workers (not the learner), up to `launcher.max_restarts` each; a
        worker past its budget is reported and, by default, ends the run."""
        budget = self.cfg.launcher.max_restarts
        for c in self.children:
            if c.service == "learner" or c.alive() or self._stopping or not self.restart_crashed or c.proc is None:
                continue
            if c.restarts >= budget:
                if not getattr(c, "exhausted", False):
                    c.exhausted = True
                    msg = (f"{c.worker} exited with {c.proc.returncode} after {c.restarts} restart(s): "
                           f"launcher.max_restarts={budget} used up; see {c.log_path}")
                    with open(c.log_path, "ab") as fh:
                        fh.write(f"\n[launcher] {msg}\n".encode())
                    if self.cfg.launcher.on_exhausted == "stop":
                        self.failure = msg + " -- stopping the run (launcher.on_exhausted=stop)"
                    self._event(self.failure or msg + " -- the run goes on without it (launcher.on_exhausted=continue)")
                continue
            c.close()
            c.restarts += 1
            with open(c.log_path, "ab") as fh:
                fh.write(f"\n[launcher] {c.worker} exited with {c.proc.returncode}; restart #{c.restarts}\n".encode())
            c.start()

    def wait(self, on_tick: Callable[["LocalRun"], None] | None = None, tick_s: float = 1.0,
             timeout_s: float | None = None) -> int:
        """Block until the learner exits (returns its exit code) or `timeout_s` passes."""
        t0 = time.time()
        learner = self.learner()
        while learner.alive():
            if timeout_s is not None and time.time() - t0 > timeout_s:
                raise TimeoutError(f"run did not finish within {timeout_s:.0f}s; logs in {self.run_dir / 'logs'}")
            self.supervise_once()
            if self.failure is not None:
                return EXIT_WORKER_EXHAUSTED
            if on_tick is not None:
                on_tick(self)
            time.sleep(tick_s)
        if on_tick is not None:
            on_tick(self)
        return int(learner.proc.returncode or 0)

    def stop(self, grace_s: float = 20.0) -> None:
        self._stopping = True
        for c in self.children:
            c.signal(signal.SIGTERM)
        deadline = time.time() + grace_s
        for c in self.children:
            while c.alive() and time.time() < deadline:
                time.sleep(0.1)
            if c.alive():
                c.signal(signal.SIGKILL)
                c.proc.wait(timeout=10)
            c.close()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    def __enter__(self) -> "LocalRun":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of `metrics.jsonl`, one per learner step in step order (a step written twice
    by a learner that died before its checkpoint counts once: the last row wins); tolerant of
    a half-written last line."""
    from rlrt_core.metrics import read_metrics_rows  # not learner_loop: that imports torch

    by_step: dict[Any, dict[str, Any]] = {}
    for row in read_metrics_rows(Path(run_dir) / "metrics.jsonl"):
        by_step[row.get("step")] = row
    return [by_step[k] for k in sorted(by_step, key=lambda k: (k is None, k if isinstance(k, (int, float)) else 0))]


def expected_workers(run_dir: str | Path) -> list[dict[str, Any]]:
    """The workers the launcher started for this run (`plan.json`), or [] when none."""
    try:
        return json.loads((Path(run_dir) / "plan.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []


def service_endpoints(run_dir: str | Path) -> list[dict[str, Any]]:
    """Service registration files written by each running service (admin port, pid, ...)."""
    out = []
    d = Path(run_dir) / "services"
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            out.append(json.loads(f.read_text()))
        except (json.JSONDecodeError, OSError):
            continue
    return out
