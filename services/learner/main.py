"""Learner service: a thin adapter around `rlrt_core.learner_loop.LearnerLoop` (dispatch
under staleness admission, collect, train, commit, checkpoint, recover) that wires it to
Redis, the gRPC weight server and the admin app.

Under `torchrun --nproc-per-node N` (with `learner.deepspeed` set) rank 0 is this service and
ranks 1..N-1 follow it (`rlrt_core.learner_ranks`): they train their share of every step.

The weight server binds its own port (`transport.weights_port`, 0 = any free one; a taken
fixed port is retried, then reported) and every announcement carries the address it serves
on, so workers find it without the launcher guessing ports.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys

import torch
from pydantic import BaseModel, Field

from rlrt_core.config import RunConfig
from rlrt_core.data import load_problems
from rlrt_core.learner import PolicyLearner
from rlrt_core.learner_loop import LearnerLoop, StopRequested
from rlrt_core.learner_ranks import RankedLearner, RankLost, follower_main, rank_device
from rlrt_core.models import load_model, load_tokenizer
from services.common.admin import ActionRefused
from services.common.explore import explore_router
from services.common.runtime import ServiceRuntime

log = logging.getLogger("rlrt.learner")


class StalenessBody(BaseModel):
    max_staleness: int = Field(..., ge=0, le=1000)


def advertised_host(cfg: RunConfig) -> str:
    """The host workers should dial: `weights_host`, or this machine's address when the
    server binds every interface."""
    if cfg.transport.weights_advertise:
        return cfg.transport.weights_advertise
    host = cfg.transport.weights_host
    if host not in ("0.0.0.0", "::", "[::]", ""):
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()


def start_weight_server(cfg: RunConfig, *, attempts: int = 20, delay_s: float = 0.5):
    """Start the WeightServer on the configured port (0 = a free one chosen by the kernel);
    a fixed port held by another process is retried for a while, then reported naming the field."""
    from rlrt_core.weights.server import WeightServer

    return WeightServer.start_from_config(cfg.transport, field="transport.weights_port", attempts=attempts,
                                          delay_s=delay_s)


def run(cfg: RunConfig, worker: str) -> int:
    from rlrt_core.weights.announce import announce_version, read_announced_version

    lc = cfg.learner
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and lc.deepspeed is None:
        log.error("WORLD_SIZE=%d: several learner ranks need learner.deepspeed (ZeRO shards the step across "
                  "them); set it, or run one process", world)
        return 2
    if rank > 0:  # a follower: no Redis, no ports; rank 0 sends it every step
        from services.common.runtime import setup_logging

        setup_logging(f"{worker}-rank{rank}")
        torch.manual_seed(lc.seed)
        random.seed(lc.seed)
        code = follower_main(cfg)
        # Leave without tearing down the process group or the interpreter: after a clean stop,
        # gloo's threads being destroyed while rank 0 exits sometimes abort the process
        # ("terminate called without an active exception", exit -6), which torchrun counts as a
        # failed rank. A follower holds nothing to save (rank 0 writes checkpoints; shard writes
        # were acknowledged), and the OS closes its sockets.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    rt = ServiceRuntime("learner", cfg, worker)
    rt.install_signal_handlers()
    if cfg.transport.weights_backend == "collective":  # before the model: refuse what cannot run here
        from rlrt_core.weights.collective import resolve_backend

        try:
            resolve_backend(cfg.transport.weights_collective_backend)
        except ValueError as err:
            log.error("transport.weights_collective_backend %s: %s", cfg.transport.weights_collective_backend, err)
            rt.close()
            return 2
    torch.manual_seed(lc.seed)
    random.seed(lc.seed)
    holder: dict[str, LearnerLoop] = {}

    def status() -> dict:
        loop = holder.get("loop")
        out = loop.status() if loop is not None else {"version": None, "step": 0, "total_steps": lc.total_steps}
        try:
            out["queues"] = rt.bus.stats()
        except Exception as err:
            out["queues"] = {"error": repr(err)}
        return out

    def act_pause(_b) -> dict:
        holder["loop"].pause(True)
        return {"paused": True}

    def act_resume(_b) -> dict:
        holder["loop"].pause(False)
        return {"paused": False}

    def act_staleness(body: StalenessBody) -> dict:
        try:
            return {"max_staleness": holder["loop"].set_max_staleness(body.max_staleness)}
        except ValueError as err:
            raise ActionRefused("max_staleness", str(err)) from None

    def act_checkpoint(_b) -> dict:
        return {"checkpoint": "requested", "at_step": holder["loop"].request_checkpoint()}

    # The run explorer (/explore) over the samples this learner writes to its run dir.
    admin_port = rt.start_admin(status, actions={"pause": (None, act_pause), "resume": (None, act_resume),
                                                 "staleness": (StalenessBody, act_staleness),
                                                 "checkpoint": (None, act_checkpoint)},
                                routers=[explore_router(cfg.metrics.run_dir)])
    log.info("run explorer: http://%s:%d/explore (samples every %d steps)", cfg.metrics.http_host, admin_port,
             cfg.metrics.sample_every)
    rt.set_ready(False, "loading model and data")
    problems = load_problems(cfg.data)
    if not problems:
        log.error("the data set is empty: nothing to train on")
        rt.close()
        return 2
    device = rank_device(lc.device)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, device=device, cache_dir=cfg.model.cache_dir)
    vocab_size = int(model.get_output_embeddings().weight.shape[0])  # before ZeRO-3 partitions it (shape 0)
    # Only the run samples need text: the tokenizer decodes their token pieces.
    tokenizer = (load_tokenizer(cfg.model.path, cache_dir=cfg.model.cache_dir)
                 if cfg.metrics.sample_every else None)
    learner = PolicyLearner(model, lc, cfg.algorithm, temperature=cfg.rollout.temperature, device=device)
    if world > 1:
        learner = RankedLearner(learner)
    try:
        server = start_weight_server(cfg)
    except RuntimeError as err:
        log.error("%s", err)
        if isinstance(learner, RankedLearner):
            learner.close()
        rt.close()
        return 2
    except BaseException:
        if isinstance(learner, RankedLearner):
            learner.close()  # the followers exit instead of waiting dist_timeout_s for us
        raise
    address = f"{advertised_host(cfg)}:{server.port}"
    log.info("weight server listening on %s:%d (announced as %s)", cfg.transport.weights_host, server.port, address)
    sender = weights = None
    if cfg.transport.weights_backend == "collective":
        from rlrt_core.weights.collective import CollectivePublisher, CollectiveSender, announce_sender

        t = cfg.transport
        try:
            sender = CollectiveSender(host=t.weights_host, port=0, backend=t.weights_collective_backend,
                                      timeout_s=t.weights_collective_timeout_s, metrics=rt.metrics)
        except (ValueError, RuntimeError) as err:
            log.error("transport.weights_backend collective: %s", err)
            server.stop(grace_s=0)
            if isinstance(learner, RankedLearner):
                learner.close()
            rt.close()
            return 2
        weights = CollectivePublisher(server, sender)
        sender_address = sender.address(advertised_host(cfg))
        log.info("collective weight sender (%s) on %s", sender.backend, sender_address)

    def announce(version: int) -> None:
        if sender is not None:  # again with every version: a fresh run or a Redis data loss clears the key
            announce_sender(rt.redis, cfg.run_name, address=sender_address, backend=sender.backend,
                            prefix=cfg.transport.stream_prefix)
        announce_version(rt.redis, cfg.run_name, version, prefix=cfg.transport.stream_prefix, address=address)

    loop = LearnerLoop(cfg, learner, problems, bus=rt.bus, weights=weights or server, announce=announce,
                       read_announced=lambda: read_announced_version(rt.redis, cfg.run_name,
                                                                     prefix=cfg.transport.stream_prefix),
                       worker=worker, vocab_size=vocab_size,
                       metrics=rt.metrics, on_progress=rt.progressed, on_wait=rt.wait_for, stop=rt.stop_event,
                       tokenizer=tokenizer)
    holder["loop"] = loop
    rt.extra_heartbeat = lambda: {"version": loop.version, "step": loop.step}
    code = 0
    try:
        loop.start()
        rt.set_ready(True)

        def step() -> bool:
            if loop.done:
                rt.stop_event.set()
                return False
            return loop.round()

        # A failed round leaves consumed entries pending for us: re-read them next round.
        rt.loop(step, on_error=rt.retry_pending())
        loop.finish()  # stopped by SIGTERM / Ctrl-C (or done): keep the progress
    except StopRequested as stop:
        log.warning("stopped while waiting for %s: the step is not committed; a restart re-trains it", stop)
        code = 0
    except RankLost as lost:
        log.error("%s; exiting for a restart of every rank (it resumes from the last checkpoint)", lost)
        code = 1
    finally:
        if isinstance(learner, RankedLearner):
            learner.close(stop_followers=code == 0)
        if sender is not None:
            sender.close()
        server.stop(grace_s=2.0)
        rt.close()
    log.info("finished at step %d (version %d)", loop.step, loop.version)
    return code
