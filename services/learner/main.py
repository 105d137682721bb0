"""Learner: dispatches prompts under staleness admission, trains on `scored` groups,
publishes every new weight version over gRPC, checkpoints and resumes.

Loop, in order:
  1. dispatch   while in flight < (max_staleness + 1) x groups_per_step, publish PromptTasks
                with min_version = current version (max_staleness = 0 is exactly synchronous)
  2. collect    consume `scored`; drop groups whose lag exceeds max_staleness (counted);
                never train on a group id twice
  3. train      once groups_per_step groups are buffered: PolicyLearner.step (rlrt_core.learner)
  4. publish    version += 1, serve it on WeightService and announce it on Redis
  5. record     metrics.jsonl row + Prometheus; checkpoint every N steps (atomic)
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from rlrt_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlrt_core.config import RunConfig
from rlrt_core.data import load_problems
from rlrt_core.learner import PolicyLearner, TrainGroup, TrainSample
from rlrt_core.metrics import RateWindow
from rlrt_core.models import load_model
from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.staleness import AdmissionController
from rlrt_core.transport.streams import BackpressureError
from services.common.runtime import ServiceRuntime

log = logging.getLogger("rlrt.learner")
IN, GROUP = "scored", "learner"


class StalenessBody(BaseModel):
    max_staleness: int = Field(..., ge=0, le=1000)


class ProblemCursor:
    """Deterministic pass over the data set, reshuffled every epoch; resumable."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._order = self._perm()

    def _perm(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self) -> int:
        if self.index >= self.n:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._perm()
        i = self._order[self.index]
        self.index += 1
        return i

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def to_train_group(g: pb.RolloutGroup) -> TrainGroup:
    """Protobuf group (after verifier and teacher) -> the learner's plain dataclasses."""
    if len(g.verifier_results) != len(g.completions):
        raise ValueError(f"group {g.group_id}: {len(g.completions)} completions, {len(g.verifier_results)} rewards")
    samples = []
    for i, c in enumerate(g.completions):
        sc = g.teacher_scores[i] if i < len(g.teacher_scores) else None
        has = sc is not None and len(sc.teacher_logprobs) == len(c.token_ids) and len(c.token_ids) > 0
        if len(c.logprobs) != len(c.token_ids):
            raise ValueError(f"group {g.group_id}: completion {i} has {len(c.token_ids)} tokens "
                             f"but {len(c.logprobs)} behaviour log-probs")
        samples.append(TrainSample(prompt_ids=list(g.prompt_ids), response_ids=list(c.token_ids),
                                   behavior_logprobs=list(c.logprobs), reward=float(g.verifier_results[i].reward),
                                   student_logprobs=list(sc.student_logprobs) if has else None,
                                   teacher_logprobs=list(sc.teacher_logprobs) if has else None))
    return TrainGroup(group_id=g.group_id, version=int(g.version), samples=samples)


def _export_step(m, row: dict[str, Any], lags: list[int], rate: RateWindow) -> None:
    """One learner step's metrics.jsonl row -> Prometheus gauges/counters/histograms."""
    def g(key: str, default: float = 0.0) -> float:
        v = row.get(key, default)
        return float(v) if isinstance(v, (int, float)) else default

    m.step.set(row["step"])
    m.loss.set(g("loss/loss"))
    m.reward_mean.set(g("reward/mean"))
    m.mixed_groups.set(g("groups/mixed_fraction"))
    m.response_length.set(g("length/mean"))
    if "loss/entropy" in row:
        m.entropy.set(g("loss/entropy"))
    m.grad_norm.set(g("optim/grad_norm"))
    m.learning_rate.set(g("optim/lr"))
    m.mixing_lambda.set(g("optim/lambda"))
    m.clipped.labels(bound="low").set(g("loss/clip_frac_low"))
    m.clipped.labels(bound="high").set(g("loss/clip_frac_high"))
    m.clipped.labels(bound="dual").set(g("loss/dual_clip_frac"))
    m.is_weight_mean.set(g("loss/is_weight_mean", 1.0))
    m.is_weight_max.set(g("loss/is_weight_max", 1.0))
    m.is_truncated.set(g("loss/is_truncated_frac"))
    m.upweighted.set(g("rlrt/upweighted_frac"))
    for lag in lags:
        m.staleness.observe(lag)
    m.skipped_nonfinite.inc(g("optim/skipped_updates"))
    m.trained_groups.inc(len(lags))
    m.trained_tokens.inc(g("tokens/trained"))
    m.learner_tokens_per_second.set(rate.add(g("tokens/trained")))
    m.step_seconds.observe(g("time/step_s"))


def run(cfg: RunConfig, worker: str) -> int:
    from rlrt_core.weights.announce import announce_version, read_announced_version
    from rlrt_core.weights.server import WeightServer

    rt = ServiceRuntime("learner", cfg, worker)
    rt.install_signal_handlers()
    m = rt.metrics
    lc, algo = cfg.learner, cfg.algorithm
    run_dir = Path(cfg.metrics.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    torch.manual_seed(lc.seed)
    random.seed(lc.seed)

    admission = AdmissionController(max_staleness=lc.max_staleness, groups_per_step=lc.groups_per_step)
    flags = {"paused": False, "checkpoint": False}
    totals = Counter()
    state: dict[str, Any] = {"version": 0, "step": 0, "buffer": [], "learner": None, "waiting_since": time.time()}

    def status() -> dict:
        try:
            queues = rt.bus.stats()
        except Exception as err:
            queues = {"error": repr(err)}
        return {"version": state["version"], "step": state["step"], "total_steps": lc.total_steps,
                "processed": totals["trained_groups"], "in_flight": admission.in_flight,
                "max_staleness": admission.max_staleness, "paused": flags["paused"],
                "buffered": len(state["buffer"]), "counters": dict(totals), "queues": queues}

    def act_pause(_b: Any) -> dict:
        flags["paused"] = True
        return {"paused": True}

    def act_resume(_b: Any) -> dict:
        flags["paused"] = False
        return {"paused": False}

    def act_staleness(body: StalenessBody) -> dict:
        admission.set_max_staleness(body.max_staleness)
        return {"max_staleness": admission.max_staleness}

    def act_checkpoint(_b: Any) -> dict:
        flags["checkpoint"] = True
        return {"checkpoint": "requested", "at_step": state["step"]}

    rt.start_admin(status, actions={"pause": (None, act_pause), "resume": (None, act_resume),
                                    "staleness": (StalenessBody, act_staleness),
                                    "checkpoint": (None, act_checkpoint)})
    rt.set_ready(False, "loading model and data")
    problems = load_problems(cfg.data)
    if not problems:
        log.error("the data set is empty: nothing to train on")
        rt.close()
        return 2
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, device=lc.device, cache_dir=cfg.model.cache_dir)
    if lc.deepspeed is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Only one process reads Redis; ranks would need the same groups each step.
        log.error("learner.deepspeed: this service runs one rank (WORLD_SIZE=%s given); multi-rank ZeRO is "
                  "available to rlrt_core.learner.PolicyLearner callers that feed every rank the same groups",
                  os.environ["WORLD_SIZE"])
        rt.close()
        return 2
    learner = PolicyLearner(model, lc, algo, temperature=cfg.rollout.temperature, device=lc.device)
    cursor = ProblemCursor(len(problems), seed=cfg.data.shuffle_seed)

    ck = latest_checkpoint(ckpt_dir)
    if ck is not None:
        with learner.full_params(modify=True):
            loaded = load_checkpoint(ck, model=model, optimizer=learner.checkpoint_optimizer(),
                                     scheduler=learner.scheduler)
        learner.weights_loaded()
        extra = loaded.state.get("extra", {})
        learner.load_state(extra.get("learner", {}))
        admission.load_state_dict(extra.get("admission", {}))
        c = extra.get("cursor", {})
        cursor = ProblemCursor(len(problems), seed=cfg.data.shuffle_seed, epoch=c.get("epoch", 0), index=c.get("index", 0))
        totals.update(extra.get("totals", {}))
        state["version"], state["step"] = loaded.version, loaded.step
        log.info("resumed from %s: step %d, version %d", ck, loaded.step, loaded.version)

    bus = rt.bus
    if ck is None:
        # A fresh run: forget streams, dedupe sets and weight announcements that an earlier
        # run of the same name left in this Redis (workers reload when versions go back).
        removed = bus.delete_run()
        if removed:
            log.info("fresh run: removed %d stale Redis keys of run %r", removed, cfg.run_name)
    bus.ensure_groups()

    if ck is not None:
        # Versions only move forward: if the old process announced versions after its last
        # checkpoint, those weights are lost, so the resumed policy takes the next unused id
        # (groups generated by the lost weights must never look on-policy).
        announced = read_announced_version(rt.redis, cfg.run_name, prefix=cfg.transport.stream_prefix)
        if announced is not None and announced >= state["version"] + 1:
            log.info("versions %d..%d were announced after the checkpoint; continuing at %d",
                     state["version"] + 1, announced, announced + 1)
            state["version"] = announced + 1
    server = WeightServer.from_config(cfg.transport)
    server.start()

    def publish(version: int) -> None:
        t0 = time.perf_counter()
        with learner.full_params():
            weights = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        server.publish(version, weights)
        announce_version(rt.redis, cfg.run_name, version, prefix=cfg.transport.stream_prefix)
        m.learner_weight_version.set(version)
        m.weight_publish_seconds.observe(time.perf_counter() - t0)
        log.info("published version %d in %.2fs", version, time.perf_counter() - t0)

    rate = RateWindow()
    publish(state["version"])
    metrics_path = run_dir / "metrics.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    rt.set_ready(True)

    def checkpoint() -> None:
        extra = {"learner": learner.state(), "admission": admission.state_dict(), "cursor": cursor.state(),
                 "totals": dict(totals)}
        t0 = time.perf_counter()
        with learner.full_params():
            path = save_checkpoint(ckpt_dir, step=state["step"], version=state["version"], model=model,
                                   optimizer=learner.checkpoint_optimizer(), scheduler=learner.scheduler,
                                   extra=extra, keep=lc.keep_checkpoints)
        m.checkpoint_seconds.observe(time.perf_counter() - t0)
        state["ckpt_step"] = state["step"]
        log.info("checkpoint %s", path)

    def dispatch() -> int:
        if flags["paused"]:
            return 0
        n = admission.can_dispatch()
        payloads = []
        now = time.time()
        for _ in range(n):
            p = problems[cursor.next()]
            task = pb.PromptTask(group_id=f"{cfg.run_name}-v{state['version']}-{uuid.uuid4().hex[:12]}",
                                 run_id=cfg.run_name, n_samples=cfg.rollout.n_samples,
                                 min_version=state["version"], dispatched_at=now)
            task.problem.id, task.problem.prompt, task.problem.answer = p.id, p.prompt, p.answer
            if p.solution:
                task.problem.solution = p.solution
            payloads.append(task.SerializeToString())
        if payloads:
            try:
                bus.publish_many("prompts", payloads)
            except BackpressureError as err:  # the bus is full: try again next round
                log.warning("dispatch deferred: %s", err)
                return 0
            admission.on_dispatched(len(payloads))
        return len(payloads)

    def train_step() -> None:
        batch = state["buffer"][: lc.groups_per_step]
        state["buffer"] = state["buffer"][lc.groups_per_step:]
        wait_s = time.time() - state["waiting_since"]
        m.data_wait_seconds.observe(wait_s)
        groups = [tg for _, tg, _ in batch]
        lags = [state["version"] - tg.version for tg in groups]
        res = learner.step(groups)
        state["step"] += 1
        state["version"] += 1
        publish(state["version"])
        bus.ack_many([e for e, _, _ in batch], dedupe_ids=[tg.group_id for tg in groups])
        admission.on_consumed(len(batch))
        totals["trained_groups"] += len(batch)
        totals["skipped_updates_total"] += res.skipped_updates
        state["waiting_since"] = time.time()
        d_bar = [x for _, _, x in batch if x is not None]
        row = {"step": state["step"], "version": state["version"], "method": algo.method, "time": time.time(),
               **res.metrics, "staleness/mean": sum(lags) / len(lags), "staleness/max": max(lags),
               "staleness/hist": dict(Counter(lags)), "time/wait_data_s": wait_s,
               "dropped_stale_total": totals["dropped_stale"], "skipped_updates_total": totals["skipped_updates_total"],
               "duplicates_total": totals["duplicates"], "in_flight": admission.in_flight}
        if d_bar:
            row["rlrt/position_kl_mean"] = sum(d_bar) / len(d_bar)
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        _export_step(m, row, lags, rate)
        log.info("step %d v%d reward %.3f len %.1f loss-clip %.3f (%.1fs, waited %.1fs)", state["step"],
                 state["version"], row["reward/mean"], row["length/mean"], row.get("loss/clip_frac", 0.0),
                 row["time/step_s"], wait_s)
        if (lc.checkpoint_every and state["step"] % lc.checkpoint_every == 0) or state["step"] >= lc.total_steps \
                or flags["checkpoint"]:
            flags["checkpoint"] = False
            checkpoint()

    def step() -> bool:
        if state["step"] >= lc.total_steps:
            rt.stop_event.set()
            return False
        # The bus knows exactly how many groups are still in the pipeline (each is one
        # unfinished entry of one stage); this also repairs counts for dead-lettered groups.
        admission.reconcile(bus.backlog())
        dispatched = dispatch()
        pairs = bus.consume_messages(IN, GROUP, worker, pb.RolloutGroup, count=lc.groups_per_step,
                                     block_ms=min(cfg.transport.block_ms, 500))
        done_before = bus.seen([g.group_id for _, g in pairs]) if pairs else []
        buffered = {tg.group_id: e.id for e, tg, _ in state["buffer"]}
        for (e, g), trained in zip(pairs, done_before):
            if buffered.get(g.group_id) == e.id:  # re-read after an error: already buffered
                continue
            if trained or g.group_id in buffered:  # never train on a group twice
                bus.ack(e)
                totals["duplicates"] += 1
                continue
            try:
                tg = to_train_group(g)
            except ValueError as err:
                bus.dead_letter(e, f"learner: {err}")
                m.dead_lettered.labels(reason="bad_rollout_group").inc()
                totals["dead"] += 1
                continue
            if admission.is_stale(tg.version, state["version"]):
                bus.ack(e, dedupe_id=tg.group_id)
                admission.on_dropped(1, lag=state["version"] - tg.version)
                totals["dropped_stale"] += 1
                m.dropped_stale.inc()
                continue
            kls = [sc.position_kl_mean for sc in g.teacher_scores if len(sc.position_kl)]
            state["buffer"].append((e, tg, sum(kls) / len(kls) if kls else None))
            buffered[tg.group_id] = e.id
        # Buffered groups age by one version per step: filter them again before training.
        kept = []
        for e, tg, kl in state["buffer"]:
            if admission.is_stale(tg.version, state["version"]):
                bus.ack(e, dedupe_id=tg.group_id)
                admission.on_dropped(1, lag=state["version"] - tg.version)
                totals["dropped_stale"] += 1
                m.dropped_stale.inc()
            else:
                kept.append((e, tg, kl))
        state["buffer"] = kept
        if flags["checkpoint"] and len(state["buffer"]) < lc.groups_per_step:
            flags["checkpoint"] = False
            checkpoint()
        if len(state["buffer"]) >= lc.groups_per_step:
            train_step()
            return True
        m.inflight_groups.set(admission.in_flight)
        if state["buffer"]:  # keep buffered entries ours while we wait for the rest of the batch
            bus.touch([e for e, _, _ in state["buffer"]])
        return bool(pairs) or dispatched > 0

    state["ckpt_step"] = state["step"]
    try:
        # A failed round leaves consumed entries pending for us: re-read them next round.
        rt.loop(step, on_error=rt.retry_pending(IN, GROUP))
        if state["step"] > state["ckpt_step"]:  # stopped by SIGTERM / Ctrl-C: keep the progress
            checkpoint()
    finally:
        server.stop(grace_s=2.0)
        rt.close()
    log.info("finished at step %d (version %d)", state["step"], state["version"])
    return 0
