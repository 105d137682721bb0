"""Teacher scorer: `verified` -> student and teacher views of the sampled tokens -> `scored`.

Student view  P_S = π_θ(· | x, y<t);  teacher view  P_T = π_θ(· | x, c, y<t)   (paper eq. 1),
both on the same weights. What to score, with which privileged context and which extra rows
(top-k support, entropy) is the method's spec (`rlrt_core.methods`); the work on one group is
`rlrt_core.teacher_scoring.score_group`, packed by `codec.set_rollout_scores`. This module only
wires that to the stream, the weights and the metrics.
"""

from __future__ import annotations

import logging
import time

import torch

from rlrt_core import heap
from rlrt_core.config import RunConfig
from rlrt_core.engines import make_teacher_engine
from rlrt_core.methods import rollouts_to_score
from rlrt_core.teacher_scoring import score_group
from rlrt_core.transport.codec import Limits, set_rollout_scores
from services.common.runtime import ServiceRuntime
from services.common.stage import relay_groups
from services.common.weight_sync import WeightSync

log = logging.getLogger("rlrt.teacher")


def _export_asymmetry(m, d_hats: list[torch.Tensor], d_bars: list[torch.Tensor]) -> None:
    """Mean and p90 of D̂_t and D̄_t over the tokens scored for one group."""
    for values, mean_g, p90_g in ((d_hats, m.token_asym_mean, m.token_asym_p90),
                                  (d_bars, m.position_asym_mean, m.position_asym_p90)):
        flat = torch.cat([v.float().flatten() for v in values]) if values else torch.empty(0)
        if flat.numel():
            mean_g.set(float(flat.mean()))
            p90_g.set(float(torch.quantile(flat, 0.9)))


def run(cfg: RunConfig, worker: str) -> int:
    rt = ServiceRuntime("teacher", cfg, worker)
    rt.install_signal_handlers()
    m = rt.metrics
    spec = cfg.algorithm.spec
    context = cfg.algorithm.teacher_context(cfg.teacher)
    counters = {"groups": 0, "rollouts_scored": 0, "not_selected": 0, "no_context": 0, "dead_lettered": 0}
    engine = None

    def status() -> dict:
        return {"version": engine.version if engine is not None else None, "processed": counters["groups"],
                "counters": dict(counters), "method": spec.name, "context": context}

    rt.start_admin(status)
    rt.set_ready(False, "loading model")
    # teacher.engine: a torch model scored in chunks, or vLLM prompt log-probs (the engine itself scores).
    engine = make_teacher_engine(cfg)
    model, tok = (engine.model if cfg.teacher.engine == "torch" else engine), engine.tokenizer
    rt.extra_heartbeat = lambda: {"version": engine.version}

    def on_loaded(version: int, seconds: float) -> None:
        m.teacher_weight_version.set(version)
        m.teacher_weight_load_seconds.observe(seconds)

    sync = WeightSync(cfg, rt.redis, engine.load_weights, version=engine.version, on_loaded=on_loaded,
                      on_wait=rt.wait_for, metrics=m,
                      collective=engine.collective_link() if cfg.transport.weights_backend == "collective" else None)
    rt.bus.ensure_group(rt.stage.input, rt.stage.group)
    rt.set_ready(True)
    limits = Limits(vocab_size=engine.vocab_size, max_model_len=cfg.model.max_model_len)

    def handle(g) -> None:  # a RolloutGroup, enriched in place
        if len(g.verifier_results) != len(g.completions):
            raise ValueError(f"{len(g.completions)} completions but {len(g.verifier_results)} verifier results")
        t0 = time.perf_counter()
        rewards = [float(v.reward) for v in g.verifier_results]
        selected = len(rollouts_to_score(spec, rewards))
        with torch.no_grad():
            scores = score_group(model, tok, spec, prompt_text=g.problem.prompt, prompt_ids=list(g.prompt_ids),
                                 solution=g.problem.solution if g.problem.HasField("solution") else None,
                                 completions_token_ids=[list(c.token_ids) for c in g.completions],
                                 completion_texts=[c.text for c in g.completions], rewards=rewards,
                                 context=context, topk=cfg.teacher.topk, distill_topk=cfg.algorithm.distill_topk,
                                 teacher_template=cfg.teacher.teacher_template, batch_size=cfg.teacher.batch_size)
        set_rollout_scores(g, scores, teacher_version=engine.version)
        m.skipped.labels(reason="not_selected").inc(len(rewards) - selected)
        counters["not_selected"] += len(rewards) - selected
        d_hats, d_bars = [], []
        for sc in scores:
            if sc is None:
                continue
            m.context.labels(kind=sc.context_kind).inc()
            if not sc.scored:
                counters["no_context"] += 1
                m.skipped.labels(reason="no_context").inc()
                continue
            n = len(sc.student_logprobs)
            d_hats.append(sc.student_logprobs - sc.teacher_logprobs)
            if sc.position_kl is not None:
                d_bars.append(sc.position_kl)
            counters["rollouts_scored"] += 1
            m.rollouts_scored.inc()
            m.scored_tokens.inc(n)
        _export_asymmetry(m, d_hats, d_bars)
        m.score_seconds.observe(time.perf_counter() - t0)

    def step() -> bool:
        sync.sync()
        moved = relay_groups(rt, count=4, handle=handle, counters=counters, limits=limits)
        if moved:
            heap.trim()  # the batch's logits and activations were freed (rlrt_core.heap)
        return moved

    try:
        # A failed batch leaves its entries pending for us: re-read them next round.
        rt.loop(step, on_error=rt.retry_pending())
    finally:
        sync.close()
        engine.close()
        rt.close()
    return 0
