"""Rollout worker: `prompts` -> K completions per prompt -> `rollouts`.

Per batch: take up to `rollout.groups_per_batch` PromptTasks, make sure the engine holds
at least every task's `min_version` (and the newest announced version), sample K
completions with behaviour log-probs, and publish one RolloutGroup per task while acking
the tasks in the same Redis transaction. Any number of workers may run side by side.
"""

from __future__ import annotations

import logging
import time

from rlrt_core.config import RunConfig
from rlrt_core.engines import SamplingParams, make_engine
from rlrt_core.metrics import RateWindow
from rlrt_core.prompts import student_prompt_ids
from rlrt_core.proto import trajectory_pb2 as pb
from services.common.runtime import ServiceRuntime
from services.common.weight_sync import WeightSync

log = logging.getLogger("rlrt.rollout")
IN, OUT, GROUP = "prompts", "rollouts", "rollout"


def run(cfg: RunConfig, worker: str) -> int:
    rt = ServiceRuntime("rollout", cfg, worker)
    rt.install_signal_handlers()
    m = rt.metrics
    counters = {"groups": 0, "completions": 0, "tokens": 0, "dead": 0}
    busy = {"s": 0.0, "since": time.time()}
    engine = None
    sync = None

    def status() -> dict:
        return {"version": engine.version if engine is not None else None, "processed": counters["groups"],
                "counters": dict(counters), "engine": cfg.rollout.engine,
                "busy_fraction": busy["s"] / max(time.time() - busy["since"], 1e-9)}

    rt.start_admin(status)
    rt.set_ready(False, "loading model")
    engine = make_engine(cfg)
    tok = engine.tokenizer

    def on_loaded(version: int, seconds: float) -> None:
        m.weight_version.set(version)
        m.weight_load_seconds.observe(seconds)

    sync = WeightSync(cfg, rt.redis, engine.load_weights, version=engine.version, on_loaded=on_loaded)
    rt.bus.ensure_group(IN, GROUP)
    m.weight_version.set(engine.version)
    rt.set_ready(True)
    sampling_base = cfg.rollout
    rate = RateWindow()

    def step() -> bool:
        pairs = rt.bus.consume_messages(IN, GROUP, worker, pb.PromptTask, count=cfg.rollout.groups_per_batch,
                                        block_ms=cfg.transport.block_ms)
        if not pairs:
            sync.sync()  # idle: still pick up new weights
            return False
        tasks = []
        for e, task in pairs:
            try:
                if not task.group_id or not task.problem.prompt:
                    raise ValueError("PromptTask without group_id or problem.prompt")
                prompt_ids = student_prompt_ids(tok, task.problem.prompt)
                if len(prompt_ids) + 1 > cfg.model.max_model_len:
                    raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds model.max_model_len "
                                     f"({cfg.model.max_model_len})")
            except ValueError as err:  # bad input: dead-letter it, keep the rest flowing
                rt.bus.dead_letter(e, f"rollout: bad PromptTask: {err}")
                m.dead_lettered.labels(reason="bad_prompt_task").inc()
                counters["dead"] += 1
                continue
            tasks.append((e, task, prompt_ids))
        if not tasks:
            return True
        need = max(t.min_version for _, t, _ in tasks)
        sync.sync(min_version=need, wait=True, stop=rt.stop_event.is_set)
        if engine.version < need:  # stopping while waiting: leave the tasks pending for a peer
            return True
        version = engine.version
        n = max(int(t.n_samples) or cfg.rollout.n_samples for _, t, _ in tasks)
        sp = SamplingParams(n=n, temperature=sampling_base.temperature, top_p=sampling_base.top_p,
                            max_new_tokens=sampling_base.max_new_tokens,
                            seed=None if sampling_base.seed is None else sampling_base.seed + counters["groups"])
        t0 = time.perf_counter()
        results = engine.generate([p for _, _, p in tasks], sp)
        gen_s = time.perf_counter() - t0
        busy["s"] += gen_s
        outputs = []
        now = time.time()
        n_tok = 0
        for (e, task, prompt_ids), res in zip(tasks, results):
            g = pb.RolloutGroup(group_id=task.group_id, run_id=task.run_id, prompt_ids=prompt_ids,
                                version=version, engine=cfg.rollout.engine, worker_id=worker,
                                min_version=task.min_version)
            g.problem.CopyFrom(task.problem)
            k = int(task.n_samples) or n
            for c in res.completions[:k]:
                g.completions.add(token_ids=c.token_ids, logprobs=c.logprobs, finish_reason=c.finish_reason, text=c.text)
                n_tok += len(c.token_ids)
            g.timestamps.dispatched_at = task.dispatched_at
            g.timestamps.generated_at = now
            g.timestamps.generation_s = gen_s
            outputs.append((e, g.SerializeToString()))
        rt.bus.ack_many([e for e, _ in outputs], outputs=[[(OUT, p)] for _, p in outputs])
        counters["groups"] += len(outputs)
        counters["completions"] += sum(len(r.completions) for r in results)
        counters["tokens"] += n_tok
        m.groups.inc(len(outputs))
        for r in results:
            for c in r.completions:
                m.completions.labels(finish_reason=c.finish_reason if c.finish_reason in ("stop", "length") else "length").inc()
        m.generated_tokens.inc(n_tok)
        m.generate_seconds.observe(gen_s)
        m.engine_busy_seconds.inc(gen_s)
        m.tokens_per_second.set(rate.add(n_tok))
        m.engine_busy.set(busy["s"] / max(time.time() - busy["since"], 1e-9))
        log.info("v%d: %d groups, %d tokens in %.1fs (%.0f tok/s)", version, len(outputs), n_tok, gen_s,
                 n_tok / max(gen_s, 1e-9))
        return True

    try:
        # A failed batch leaves its entries pending for us: re-read them next round.
        rt.loop(step, on_error=rt.retry_pending(IN, GROUP))
    finally:
        sync.close()
        rt.close()
    return 0
