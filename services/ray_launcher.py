"""`rlrt launch --ray`: place the services on a Ray cluster as actors.

Ray places and restarts; it never carries data. Each actor owns the resources its service asks
for (`ray.<service>.num_gpus/num_cpus`) and runs `rlrt serve <service>` as a subprocess (Ray sets
CUDA_VISIBLE_DEVICES for the actor, the subprocess inherits it). A watcher thread in the actor
ends the actor's process when the service exits with an error, so Ray restarts the actor
(`ray.max_restarts`), which starts the service again (the learner resumes from its last
checkpoint). Trajectories go over Redis Streams and weights over gRPC, as in every deployment.

Driver, in order:
  1. Redis: `transport.redis_url`, or an embedded Redis on the driver (loopback: a single-node
     cluster only; a multi-node cluster needs a Redis every node reaches, checked here).
  2. Learner node (one actor; `ray.learner.world_size` = N > 1 runs `torchrun --standalone
     --nproc-per-node N` inside it: all ranks on that node, rank 0 is the service, a failed
     rank fails torchrun, the actor and Ray restarts it; give it num_gpus = N on GPUs): a probe actor with the learner's resources picks the node and a free port
     there; the learner actor is pinned to that node (its restarts stay there), so
     `weights_target` = <learner node IP>:<port> holds for the whole run.
  3. Actors: learner, then `ray.teacher_workers` teachers, `ray.verifier_workers` verifiers and
     `ray.rollout_workers` (or --rollout-workers) rollout workers; each kind is one consumer group.
     With `ray.relay_per_node`, one weight relay per alive node, pinned to it (`relay-<i>`,
     advertising the node's IP on a multi-node cluster); the workers switch to
     `transport.weights_relay: auto` and find the relay of their node (same host name) first.
  4. Wait for the learner to exit 0 (restarts of it are waited through), then stop everything.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlrt_core.config import RunConfig, dump_config

log = logging.getLogger("rlrt.ray")
ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def service_env(base: dict[str, str]) -> dict[str, str]:
    """The subprocess environment: the actor's (CUDA_VISIBLE_DEVICES included) minus the
    overrides that would fight the effective config file."""
    env = {k: v for k, v in base.items() if not (k.startswith("RLRT__") or k == "REDIS_URL")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


LOCAL_INIT_ATTEMPTS = 3


def _descendants(pid: int) -> set[int]:
    """Every live descendant of `pid`, from /proc (empty where /proc is not there)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
            ppid = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _init_local_ray(num_cpus: int, kw: dict[str, Any]) -> None:
    """Start a local Ray cluster, retrying a start that timed out.

    Ray gives its raylet a fixed 30 s to register with the GCS; on a loaded 2-core box that
    start has failed once in CI. The failed attempt's GCS and raylet are left running by
    `ray.init` (it raises before it records the node), so they are killed before the retry."""
    import ray

    for attempt in range(1, LOCAL_INIT_ATTEMPTS + 1):
        before = _descendants(os.getpid())
        try:
            ray.init(num_cpus=num_cpus, **kw)
            return
        except Exception as e:  # ray raises a bare Exception for this timeout
            if "timed out during startup" not in str(e) or attempt == LOCAL_INIT_ATTEMPTS:
                raise
            leftovers = _descendants(os.getpid()) - before
            log.warning("local Ray cluster did not start (attempt %d/%d: %s); killing its %d "
                        "processes and starting again", attempt, LOCAL_INIT_ATTEMPTS, e, len(leftovers))
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ray.shutdown()


class ServiceProcess:
    """The body of a service actor: one `rlrt serve` subprocess plus a watcher that ends this
    process when the service fails (Ray then restarts the actor)."""

    def __init__(self, service: str, worker: str, config_yaml: str, omp_threads: int, nproc: int = 1) -> None:
        import ray

        from services.launcher import _die_with_parent

        self.service, self.worker = service, worker
        self.node_ip = ray.util.get_node_ip_address()
        cfg_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"rlrt-ray-{os.getpid()}"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        self.cfg_dir = cfg_dir
        cfg_file = cfg_dir / "config.yaml"  # node-local: the run dir need not be shared
        cfg_file.write_text(config_yaml)
        import yaml

        run_dir = Path(yaml.safe_load(config_yaml)["metrics"]["run_dir"])
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.log_fh = open(run_dir / "logs" / f"{worker}.log", "ab", buffering=0)
        env = service_env(dict(os.environ))
        env.setdefault("OMP_NUM_THREADS", str(max(1, omp_threads)))
        cmd = [sys.executable, "-m", "services.cli.main", "serve", service, "--config", str(cfg_file),
               "--worker", worker]
        if nproc > 1:  # the learner's ranks: torchrun on this node; Ray restarts the actor, not torchrun
            cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                        "--max-restarts", "0", "-m"]
        self.log_fh.write(f"[ray] {worker} on {self.node_ip} pid {os.getpid()}: {' '.join(cmd)}\n".encode())
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=self.log_fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        self.stopping = False
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        rc = self.proc.wait()
        if self.stopping or rc == 0:
            return
        self.log_fh.write(f"\n[ray] {self.worker} exited with {rc}; ending the actor so Ray restarts it\n".encode())
        shutil.rmtree(self.cfg_dir, ignore_errors=True)  # the restarted actor writes its own
        os._exit(1)  # a dead actor process is what Ray restarts (an exception would not be)

    def info(self) -> dict[str, Any]:
        return {"worker": self.worker, "node_ip": self.node_ip, "pid": self.proc.pid, "actor_pid": os.getpid()}

    def poll(self) -> int | None:
        """None while the service runs, its exit code once it ended cleanly."""
        return self.proc.poll()

    def stop(self, grace_s: float = 20.0) -> int | None:
        self.stopping = True
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return self.proc.poll()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(self.cfg_dir, ignore_errors=True)
        return self.proc.returncode


def _probe_node() -> dict[str, Any]:
    """Runs on the node Ray picks for the learner: its id and IP (the learner's weight server
    binds a free port there itself and announces it)."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}


@dataclass
class RayRun:
    """Launch `cfg` on Ray; `run()` blocks until the learner finishes and returns its exit code."""

    cfg: RunConfig
    address: str | None = None
    rollout_workers: int | None = None
    local_num_cpus: int | None = None
    actors: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.cfg.metrics.run_dir).resolve()
        self.address = self.address or self.cfg.ray.address
        self.n_rollout = self.rollout_workers or self.cfg.ray.rollout_workers
        self._embedded = None
        self._started_ray = False

    def plan(self) -> list[tuple[str, str]]:
        """(service, worker id) of every actor, learner first."""
        out = [("learner", "learner-0")]
        out += [("teacher", f"teacher-{i}") for i in range(self.cfg.ray.teacher_workers)]
        out += [("verifier", f"verifier-{i}") for i in range(self.cfg.ray.verifier_workers)]
        out += [("rollout", f"rollout-{i}") for i in range(self.n_rollout)]
        return out

    def _resources(self, service: str) -> tuple[float, float]:
        r = getattr(self.cfg.ray, service)
        return r.num_cpus, r.num_gpus

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        kw: dict[str, Any] = {"namespace": self.cfg.ray.namespace, "include_dashboard": False,
                              "log_to_driver": False, "runtime_env": {"env_vars": {"PYTHONPATH": str(ROOT)}}}
        if self.address:
            ray.init(address=self.address, **kw)
        else:
            # A local cluster gets as many logical CPUs as the plan asks for (or the cores).
            need = sum(self._resources(s)[0] for s, _ in self.plan())
            need += self.cfg.ray.relay.num_cpus if self.cfg.ray.relay_per_node else 0.0  # one node
            num_cpus = self.local_num_cpus or max(os.cpu_count() or 1, int(need + 0.999))
            _init_local_ray(num_cpus, kw)
        self._started_ray = True

    def _redis_url(self, multi_node: bool) -> str:
        url = self.cfg.transport.redis_url
        if url:
            host = url.split("://", 1)[-1].rsplit("@", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
            if multi_node and (host in LOOPBACK or url.startswith("unix:")):
                where = "a unix socket" if url.startswith("unix:") else f"the loopback address {host}"
                raise ValueError(f"transport.redis_url points at {where} but the Ray cluster has several "
                                 "nodes: give a Redis URL every node can reach")
            return url
        if multi_node:
            raise ValueError("the Ray cluster has several nodes: set transport.redis_url (or REDIS_URL) to a "
                             "Redis every node can reach; the embedded Redis listens on the driver's loopback")
        from rlrt_core.transport.embedded import EmbeddedRedis

        self._embedded = EmbeddedRedis(self.run_dir / "redis")
        return self._embedded.start()

    def start(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._init_ray()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        cfg = self.cfg.model_copy(deep=True)
        cfg.transport.redis_url = self._redis_url(multi_node=len(alive) > 1)
        cfg.metrics.run_dir = str(self.run_dir)
        if not cfg.transport.weights_token and not cfg.transport.weights_token_file:
            from rlrt_core.weights.records import ensure_token_file

            token_file = self.run_dir / "weights.token"
            ensure_token_file(token_file)
            if len(alive) > 1:  # a token file on the driver is not on the other nodes: pass the secret
                cfg.transport.weights_token = token_file.read_text().strip()
            else:
                cfg.transport.weights_token_file = str(token_file)

        l_cpus, l_gpus = self._resources("learner")
        probe = ray.get(ray.remote(num_cpus=l_cpus, num_gpus=l_gpus)(_probe_node).remote(), timeout=600)
        single = len(alive) == 1
        cfg.transport.weights_host = "127.0.0.1" if single else "0.0.0.0"
        cfg.transport.weights_port = 0  # bound by the learner, announced with its address
        cfg.transport.weights_advertise = None if single else probe["ip"]
        cfg.transport.weights_target = None
        if cfg.ray.relay_per_node:
            cfg.transport.weights_relay = "auto"
            cfg.relay.host = "127.0.0.1" if single else "0.0.0.0"
            cfg.relay.port = 0  # bound by each relay, registered with its address
        self.cfg = cfg
        config_yaml = dump_config(cfg)
        (self.run_dir / "config.yaml").write_text(config_yaml)

        actor_cls = ray.remote(ServiceProcess)
        for service, worker in self.plan():
            cpus, gpus = self._resources(service)
            opts: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": self.cfg.ray.max_restarts,
                                    "name": f"{cfg.run_name}-{worker}", "max_concurrency": 4}
            if service == "learner":
                opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(probe["node_id"], soft=False)
            threads = max(1, int(cpus)) if cpus else 1
            nproc = cfg.ray.learner.world_size if service == "learner" else 1
            self.actors[worker] = actor_cls.options(**opts).remote(service, worker, config_yaml, threads, nproc)
        if cfg.ray.relay_per_node:
            self._start_relays(actor_cls, alive, single)
        infos = ray.get([a.info.remote() for a in self.actors.values()], timeout=600)
        for i in infos:
            log.info("%s on %s (service pid %s)", i["worker"], i["node_ip"], i["pid"])

    def _start_relays(self, actor_cls: Any, alive: list[dict[str, Any]], single: bool) -> None:
        """One relay actor pinned to each alive node; on a multi-node cluster each registers
        its node's IP (its config differs from the others' only in `relay.advertise`)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        res = self.cfg.ray.relay
        for i, node in enumerate(sorted(alive, key=lambda n: n["NodeID"])):
            worker = f"relay-{i}"
            rcfg = self.cfg.model_copy(deep=True)
            rcfg.relay.advertise = None if single else node["NodeManagerAddress"]
            opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus,
                                    "max_restarts": self.cfg.ray.max_restarts, "name": f"{rcfg.run_name}-{worker}",
                                    "max_concurrency": 4,
                                    "scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)}
            self.actors[worker] = actor_cls.options(**opts).remote("relay", worker, dump_config(rcfg), 1)

    def wait(self, timeout_s: float | None = None, tick_s: float = 1.0) -> int:
        """Block until the learner exits cleanly (returns 0) or its restarts are exhausted (returns 1)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        t0 = time.time()
        learner = self.actors["learner-0"]
        failures = 0
        limit = self.cfg.ray.max_restarts
        while True:
            if timeout_s is not None and time.time() - t0 > timeout_s:
                raise TimeoutError(f"run did not finish within {timeout_s:.0f}s; logs in {self.run_dir / 'logs'}")
            try:
                rc = ray.get(learner.poll.remote(), timeout=60)
            except GetTimeoutError:
                continue
            except RayActorError as err:
                # A restart fails the call in flight (later calls wait for the new actor); a dead
                # actor fails every call, so more failures than restarts means it is gone.
                failures += 1
                if limit >= 0 and failures > limit + 1:
                    log.error("learner actor is dead after %d restarts: %s", limit, err)
                    return 1
                time.sleep(tick_s)
                continue
            if rc is not None:
                return int(rc)
            time.sleep(tick_s)

    def stop(self) -> None:
        import ray

        if self.actors:
            refs = []
            for a in self.actors.values():
                try:
                    refs.append(a.stop.remote())
                except Exception as err:  # an actor already gone: nothing to stop
                    log.info("stop: %s", err)
            for r in refs:
                try:
                    ray.get(r, timeout=40)
                except Exception as err:
                    log.info("stop: %s", err)
            for a in self.actors.values():
                ray.kill(a, no_restart=True)
            self.actors.clear()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    def run(self, timeout_s: float | None = None) -> int:
        try:
            self.start()
            return self.wait(timeout_s=timeout_s)
        finally:
            self.stop()


