"""Rollout worker: `prompts` -> K completions per prompt -> `rollouts`.

Per batch: take up to `rollout.groups_per_batch` PromptTasks (each validated alone where it
enters: a bad one is dead-lettered with its reason), make sure the engine holds at least
every task's `min_version` (and the newest announced version), sample K completions with
behaviour log-probs, and publish one RolloutGroup per task while acking the tasks in the
same Redis transaction. Any number of workers may run side by side.

A task whose `min_version` has not been announced yet is set aside (kept pending for this
worker, touched so no peer reclaims it) while other tasks proceed; if the version still has
not come after `rollout.version_wait_s`, the task is dead-lettered with that reason.
"""

from __future__ import annotations

import logging
import time

from rlrt_core.config import RunConfig
from rlrt_core.engines import GenerationResult, SamplingParams, derive_seed, make_engine
from rlrt_core.metrics import RateWindow
from rlrt_core.prompts import student_prompt_ids
from rlrt_core.transport.codec import Limits, rollout_group
from services.common.runtime import ServiceRuntime
from services.common.weight_sync import VersionWaitTimeout, WeightSync

log = logging.getLogger("rlrt.rollout")


def run(cfg: RunConfig, worker: str) -> int:
    rt = ServiceRuntime("rollout", cfg, worker)
    rt.install_signal_handlers()
    m = rt.metrics
    st = rt.stage
    counters = {"groups": 0, "completions": 0, "tokens": 0, "dead_lettered": 0, "deferred": 0}
    busy = {"s": 0.0, "since": time.time()}
    engine = None
    # entry id -> (entry, task, prompt ids, first seen): tasks waiting for their min_version
    deferred: dict[str, tuple] = {}

    def status() -> dict:
        return {"version": engine.version if engine is not None else None, "processed": counters["groups"],
                "counters": dict(counters), "engine": cfg.rollout.engine, "deferred": len(deferred),
                "busy_fraction": busy["s"] / max(time.time() - busy["since"], 1e-9)}

    rt.start_admin(status)
    rt.set_ready(False, "loading model")
    engine = make_engine(cfg)
    tok = engine.tokenizer
    rt.extra_heartbeat = lambda: {"version": engine.version}

    def on_loaded(version: int, seconds: float) -> None:
        m.weight_version.set(version)
        m.weight_load_seconds.observe(seconds)

    sync = WeightSync(cfg, rt.redis, engine.load_weights, version=engine.version, on_loaded=on_loaded,
                      on_wait=rt.wait_for, metrics=m)
    rt.bus.ensure_group(st.input, st.group)
    m.weight_version.set(engine.version)
    rt.set_ready(True)
    sp_cfg = cfg.rollout
    rate = RateWindow()
    limits = Limits(vocab_size=engine.vocab_size, max_model_len=cfg.model.max_model_len)

    def dead(e, reason: str, kind: str) -> None:
        rt.bus.dead_letter(e, f"rollout: {reason}", kind=kind)
        counters["dead_lettered"] += 1

    def take_new() -> list[tuple]:
        pairs = rt.bus.consume_messages(st.input, st.group, worker, st.message, count=sp_cfg.groups_per_batch,
                                        block_ms=cfg.transport.block_ms if not deferred else 200, limits=limits)
        tasks = []
        for e, task in pairs:
            prompt_ids = student_prompt_ids(tok, task.problem.prompt)
            if len(prompt_ids) + 1 > cfg.model.max_model_len:
                dead(e, f"prompt of {len(prompt_ids)} tokens exceeds model.max_model_len ({cfg.model.max_model_len})",
                     "prompt_too_long")
                continue
            tasks.append((e, task, prompt_ids, time.time()))
        return tasks

    def step() -> bool:
        fresh = take_new()
        announced = max(sync.announced(), engine.version)
        ready, now = [], time.time()
        # A re-read (after an error) may return a task already set aside: keep one copy.
        candidates = dict(deferred)
        for item in fresh:
            candidates.setdefault(item[0].id, item)
        for item in candidates.values():
            e, task, _p, seen = item
            if task.min_version <= announced:
                deferred.pop(e.id, None)
                ready.append(item)
            elif now - seen > sp_cfg.version_wait_s:
                deferred.pop(e.id, None)
                dead(e, f"min_version {task.min_version} was never announced (latest {announced}) within "
                        f"rollout.version_wait_s={sp_cfg.version_wait_s:.0f}s", "version_never_announced")
            elif e.id not in deferred:
                deferred[e.id] = item
                counters["deferred"] += 1
                log.warning("task %s needs weight version %d, not announced yet (latest %d): set aside",
                            task.group_id, task.min_version, announced)
        if deferred:  # ours while they wait: keep peers from reclaiming them
            rt.bus.touch([e for e, *_ in deferred.values()])
            oldest = min(t.min_version for _, t, _, _ in deferred.values())
            rt.wait_for(f"weight version {oldest} for {len(deferred)} task(s)")
        else:
            rt.wait_for(None)
        if not ready:
            sync.sync()  # idle: still pick up new weights
            return bool(fresh)
        need = max(t.min_version for _, t, _, _ in ready)
        try:
            sync.sync(min_version=need, wait=True, stop=rt.stop_event.is_set)
        except VersionWaitTimeout:  # the announcement went backwards meanwhile: wait again next round
            for item in ready:
                deferred.setdefault(item[0].id, item)
            return True
        if engine.version < need:  # stopping while waiting: leave the tasks pending for a peer
            return True
        n = max(int(t.n_samples) or sp_cfg.n_samples for _, t, _, _ in ready)
        sp = SamplingParams(n=n, temperature=sp_cfg.temperature, top_p=sp_cfg.top_p,
                            max_new_tokens=sp_cfg.max_new_tokens,
                            seed=derive_seed(sp_cfg.seed, *(t.group_id for _, t, _, _ in ready)))
        t0 = time.perf_counter()
        results = engine.generate([p for _, _, p, _ in ready], sp)
        gen_s = time.perf_counter() - t0
        busy["s"] += gen_s
        outputs, n_tok = [], 0
        for (e, task, prompt_ids, _), res in zip(ready, results):
            k = int(task.n_samples) or n
            res_k = GenerationResult(prompt_ids=res.prompt_ids, completions=res.completions[:k], version=res.version)
            g = rollout_group(task, res_k, engine=sp_cfg.engine, worker_id=worker, generation_s=gen_s)
            n_tok += sum(len(c.token_ids) for c in res_k.completions)
            outputs.append((e, g))
        rt.bus.ack_many([e for e, _ in outputs], outputs=[[(st.output, g)] for _, g in outputs])
        rt.progressed()
        counters["groups"] += len(outputs)
        counters["completions"] += sum(len(g.completions) for _, g in outputs)
        counters["tokens"] += n_tok
        m.groups.inc(len(outputs))
        for _, g in outputs:
            for c in g.completions:
                m.completions.labels(finish_reason=c.finish_reason if c.finish_reason in ("stop", "length") else "length").inc()
        m.generated_tokens.inc(n_tok)
        m.generate_seconds.observe(gen_s)
        m.engine_busy_seconds.inc(gen_s)
        m.tokens_per_second.set(rate.add(n_tok))
        m.engine_busy.set(busy["s"] / max(time.time() - busy["since"], 1e-9))
        log.info("v%d: %d groups, %d tokens in %.1fs (%.0f tok/s)", engine.version, len(outputs), n_tok, gen_s,
                 n_tok / max(gen_s, 1e-9))
        return True

    try:
        # A failed batch leaves its entries pending for us: re-read them next round.
        rt.loop(step, on_error=rt.retry_pending())
    finally:
        sync.close()
        rt.close()
    return 0
