"""Rollout worker: `prompts` -> K completions per prompt -> `rollouts`.

Streaming (`rollout.streaming: true`; engines with a streaming API: torch and vLLM): the worker
keeps its engine's rows full: a budget of `rollout.max_inflight_groups` x K completion rows, and
a new PromptTask is taken whenever K rows are free (a completion that ended frees its row even
while its group waits for a slower sibling; vLLM's stream counts a group's K rows until the
whole group ends). Between decode steps it takes new PromptTasks into free rows, loads a newer announced weight version in place (in-flight
sequences keep going; every token records its version, a group's version is its oldest
token's), and publishes each group as soon as its K completions end, atomically with its
task's ack (one `ack_many` per round of finished groups). In-flight tasks are touched so no
peer reclaims them; after a kill -9 they stay pending and a peer reclaims them.

Batch-synchronous (`streaming: false`, the default, or an engine without streaming): per batch take up to
`rollout.groups_per_batch` tasks, sample K completions each in one generate call, publish.

Either way each task is validated alone where it enters (a bad one is dead-lettered with its
reason), and the engine holds at least every task's `min_version` before generating for it.
A task whose `min_version` has not been announced yet is set aside (kept pending for this
worker, touched so no peer reclaims it) while other tasks proceed; if the version still has
not come after `rollout.version_wait_s`, the task is dead-lettered with that reason. Any
number of workers may run side by side.
"""

from __future__ import annotations

import logging
import time

from rlrt_core import heap
from rlrt_core.config import RunConfig
from rlrt_core.engines import GenerationResult, SamplingParams, derive_seed, make_engine
from rlrt_core.metrics import RateWindow
from rlrt_core.prompts import student_prompt_ids
from rlrt_core.transport.codec import Limits, rollout_group
from services.common.runtime import ServiceRuntime
from services.common.weight_sync import VersionWaitTimeout, WeightSync

log = logging.getLogger("rlrt.rollout")
POLL_S = 0.05


def run(cfg: RunConfig, worker: str) -> int:
    rt = ServiceRuntime("rollout", cfg, worker)
    rt.install_signal_handlers()
    m = rt.metrics
    st = rt.stage
    counters = {"groups": 0, "completions": 0, "tokens": 0, "dead_lettered": 0, "deferred": 0}
    busy = {"s": 0.0, "since": time.time()}
    engine = None
    stream = None
    # entry id -> (entry, task, prompt ids, first seen): tasks waiting for their min_version
    deferred: dict[str, tuple] = {}
    # entry id -> (entry, task): tasks whose group is in the engine (streaming)
    inflight: dict[str, tuple] = {}

    def status() -> dict:
        return {"version": engine.version if engine is not None else None, "processed": counters["groups"],
                "counters": dict(counters), "engine": cfg.rollout.engine, "deferred": len(deferred),
                "streaming": stream is not None, "inflight_groups": len(inflight), "busy_s": busy["s"],
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
                      on_wait=rt.wait_for, metrics=m,
                      collective=engine.collective_link() if cfg.transport.weights_backend == "collective" else None)
    rt.bus.ensure_group(st.input, st.group)
    m.weight_version.set(engine.version)
    sp_cfg = cfg.rollout
    if sp_cfg.streaming:
        try:
            stream = engine.start_stream()
        except NotImplementedError as err:
            log.warning("rollout.streaming is on but %s; generating batch-synchronously", err)
    # admission by rows, not groups: see the module docstring
    row_budget = (sp_cfg.max_inflight_groups or sp_cfg.groups_per_batch) * sp_cfg.n_samples
    rt.set_ready(True)
    rate = RateWindow()
    limits = Limits(vocab_size=engine.vocab_size, max_model_len=cfg.model.max_model_len)
    touch_every_s = cfg.transport.claim_idle_ms / 3000.0
    last_touch = [time.monotonic()]
    last_poll = [0.0]

    def dead(e, reason: str, kind: str) -> None:
        rt.bus.dead_letter(e, f"rollout: {reason}", kind=kind)
        counters["dead_lettered"] += 1

    def take_new(count: int, block_ms: int) -> list[tuple]:
        pairs = rt.bus.consume_messages(st.input, st.group, worker, st.message, count=count, block_ms=block_ms,
                                        limits=limits)
        tasks = []
        for e, task in pairs:
            prompt_ids = student_prompt_ids(tok, task.problem.prompt)
            if len(prompt_ids) + 1 > cfg.model.max_model_len:
                dead(e, f"prompt of {len(prompt_ids)} tokens exceeds model.max_model_len ({cfg.model.max_model_len})",
                     "prompt_too_long")
                continue
            tasks.append((e, task, prompt_ids, time.time()))
        return tasks

    def sort_tasks(fresh: list[tuple]) -> list[tuple]:
        """Fresh + set-aside tasks -> those whose min_version is announced; set aside (or
        dead-letter, past rollout.version_wait_s) the rest."""
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
        return ready

    def load_for(ready: list[tuple], *, wait: bool) -> bool:
        """Make the engine hold every ready task's min_version (waiting only with `wait`);
        False (tasks set aside again) when it does not."""
        need = max(t.min_version for _, t, _, _ in ready)
        try:
            sync.sync(min_version=need, wait=wait, stop=rt.stop_event.is_set)
        except VersionWaitTimeout:  # the announcement went backwards meanwhile: wait again next round
            pass
        if engine.version < need:  # not loaded (yet), or stopping while waiting: keep them for later
            for item in ready:
                deferred.setdefault(item[0].id, item)
            return False
        return True

    def publish(outputs: list[tuple], n_tok: int, seconds: list[float]) -> None:
        """Publish groups with their tasks' acks (one round trip) and count them."""
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
        for sec in seconds:
            m.generate_seconds.observe(sec)
        m.tokens_per_second.set(rate.add(n_tok))

    def record_busy(seconds: float) -> None:
        busy["s"] += seconds
        m.engine_busy_seconds.inc(seconds)
        m.engine_busy.set(busy["s"] / max(time.time() - busy["since"], 1e-9))

    # -- batch-synchronous --------------------------------------------------------------------
    def step_batch() -> bool:
        fresh = take_new(sp_cfg.groups_per_batch, cfg.transport.block_ms if not deferred else 200)
        ready = sort_tasks(fresh)
        if not ready:
            sync.sync()  # idle: still pick up new weights
            return bool(fresh)
        if not load_for(ready, wait=True):
            return True
        n = max(int(t.n_samples) or sp_cfg.n_samples for _, t, _, _ in ready)
        sp = SamplingParams(n=n, temperature=sp_cfg.temperature, top_p=sp_cfg.top_p,
                            max_new_tokens=sp_cfg.max_new_tokens,
                            seed=derive_seed(sp_cfg.seed, *(t.group_id for _, t, _, _ in ready)))
        t0 = time.perf_counter()
        results = engine.generate([p for _, _, p, _ in ready], sp)
        gen_s = time.perf_counter() - t0
        record_busy(gen_s)
        outputs, n_tok = [], 0
        for (e, task, prompt_ids, _), res in zip(ready, results):
            k = int(task.n_samples) or n
            res_k = GenerationResult(prompt_ids=res.prompt_ids, completions=res.completions[:k], version=res.version)
            g = rollout_group(task, res_k, engine=sp_cfg.engine, worker_id=worker, generation_s=gen_s)
            n_tok += sum(len(c.token_ids) for c in res_k.completions)
            outputs.append((e, g))
        publish(outputs, n_tok, [gen_s])
        heap.trim()  # the batch's KV cache was freed (rlrt_core.heap)
        log.info("v%d: %d groups, %d tokens in %.1fs (%.0f tok/s)", engine.version, len(outputs), n_tok, gen_s,
                 n_tok / max(gen_s, 1e-9))
        return True

    # -- streaming ----------------------------------------------------------------------------
    def step_stream() -> bool:
        now = time.monotonic()
        fresh = []
        # Redis is polled (new tasks, announcements) at most every POLL_S while groups decode:
        # a tiny model's decode step takes a few ms, a Redis round trip about as long.
        if not inflight or now - last_poll[0] >= POLL_S:
            last_poll[0] = now
            # tasks set aside for their min_version will need their rows too; a task with n_samples
            # above K may overshoot the budget by its extra rows
            free = (row_budget - stream.rows - sum(int(t.n_samples) or sp_cfg.n_samples
                                                   for _, t, _, _ in deferred.values())) // sp_cfg.n_samples
            if free > 0:
                # block only when the engine has nothing to do
                block = 0 if inflight else (cfg.transport.block_ms if not deferred else 200)
                fresh = [t for t in take_new(free, block) if t[0].id not in inflight]
            sync.sync()  # between decode steps: a newer version is loaded in place, in flight
            ready = sort_tasks(fresh) if fresh or deferred else []
            if ready and load_for(ready, wait=not inflight):
                for e, task, prompt_ids, _ in ready:
                    sp = SamplingParams(n=int(task.n_samples) or sp_cfg.n_samples, temperature=sp_cfg.temperature,
                                        top_p=sp_cfg.top_p, max_new_tokens=sp_cfg.max_new_tokens,
                                        seed=derive_seed(sp_cfg.seed, task.group_id))
                    stream.add(e.id, prompt_ids, sp)
                    inflight[e.id] = (e, task)
        if not inflight:
            return bool(fresh)
        t0 = time.perf_counter()
        finished = stream.step()
        record_busy(time.perf_counter() - t0)
        if time.monotonic() - last_touch[0] > touch_every_s:  # keep peers from reclaiming work in progress
            rt.bus.touch([e for e, _ in inflight.values()])
            last_touch[0] = time.monotonic()
        if finished:
            outputs, n_tok, seconds = [], 0, []
            for f in finished:
                e, task = inflight.pop(f.key)
                gen_s = f.finished_at - f.added_at
                g = rollout_group(task, f.result, engine=sp_cfg.engine, worker_id=worker, generation_s=gen_s)
                n_tok += sum(len(c.token_ids) for c in f.result.completions)
                outputs.append((e, g))
                seconds.append(gen_s)
            publish(outputs, n_tok, seconds)
            log.info("v%d: %d groups published (%d tokens, versions %s), %d in flight", engine.version,
                     len(outputs), n_tok, sorted({g.version for _, g in outputs}), len(inflight))
        return True

    def on_stream_error(err: BaseException) -> None:
        # Whatever the engine held is dropped; the tasks are still pending for us and are
        # re-read (by retry_pending) and generated again.
        if stream is not None:
            stream.abort()
        inflight.clear()
        retry(err)

    retry = rt.retry_pending()
    try:
        # A failed round leaves its entries pending for us: re-read them next round.
        if stream is not None:
            rt.loop(step_stream, on_error=on_stream_error)
        else:
            rt.loop(step_batch, on_error=retry)
    finally:
        sync.close()
        rt.close()
    return 0
