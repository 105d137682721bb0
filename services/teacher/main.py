"""Teacher scorer: `verified` -> student and teacher views of the sampled tokens -> `scored`.

Student view  P_S = π_θ(· | x, y<t);  teacher view  P_T = π_θ(· | x, c, y<t)   (paper eq. 1),
both on the same weights. Only rollouts whose weight the method can change are scored:

    GRPO                 none (pass through)
    RLRT                 correct rollouts (r = 1) of groups with mixed rewards   (eq. 7 gate)
    RLSD, RLRT-all       every rollout of groups with mixed rewards

(a group with identical rewards has A = 0, so its token advantages are 0 whatever w_t is).
Privileged context c: the reference solution when present, else a successful peer rollout
of the same group (never the rollout itself), else none (weight 1, counted).
"""

from __future__ import annotations

import logging
import time

import torch

from rlrt_core import algorithms
from rlrt_core.config import RunConfig
from rlrt_core.engines import TorchEngine
from rlrt_core.prompts import teacher_prompt_ids
from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.scoring import score_views
from rlrt_core.transport.codec import Limits
from services.common.runtime import ServiceRuntime
from services.common.stage import relay_groups
from services.common.weight_sync import WeightSync

log = logging.getLogger("rlrt.teacher")


def rollouts_to_score(method: str, rewards: list[float]) -> list[int]:
    """Indices of the completions of one group that need teacher scores for `method`."""
    if method == "grpo" or len(set(rewards)) < 2:
        return []
    if method == "rlrt":
        return [i for i, r in enumerate(rewards) if r > 0.5]
    return list(range(len(rewards)))


def choose_context(mode: str, solution: str | None, texts: list[str], rewards: list[float],
                   i: int) -> tuple[str | None, int, int]:
    """Privileged context for completion `i`: (text, ContextKind, peer index or -1)."""
    if mode in ("solution", "solution_or_peer") and solution:
        return solution, pb.CONTEXT_KIND_SOLUTION, -1
    if mode in ("peer", "solution_or_peer"):
        # The first successful peer other than the rollout itself; deterministic.
        for j, r in enumerate(rewards):
            if j != i and r > 0.5 and texts[j].strip():
                return texts[j], pb.CONTEXT_KIND_PEER, j
    return None, pb.CONTEXT_KIND_NONE, -1


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
    method = cfg.algorithm.method
    counters = {"groups": 0, "scored": 0, "skipped_uniform": 0, "skipped_method": 0, "no_context": 0, "dead": 0}
    engine = None

    def status() -> dict:
        return {"version": engine.version if engine is not None else None, "processed": counters["groups"],
                "counters": dict(counters), "method": method}

    rt.start_admin(status)
    rt.set_ready(False, "loading model")
    # The teacher always scores with a torch model (vLLM does not return teacher-view rows).
    engine = TorchEngine(cfg.model.path, dtype=cfg.model.dtype, device=cfg.teacher.device,
                         cache_dir=cfg.model.cache_dir)
    model, tok = engine.model, engine.tokenizer

    def on_loaded(version: int, seconds: float) -> None:
        m.teacher_weight_version.set(version)
        m.teacher_weight_load_seconds.observe(seconds)

    sync = WeightSync(cfg, rt.redis, engine.load_weights, version=engine.version, on_loaded=on_loaded,
                      on_wait=rt.wait_for)
    rt.bus.ensure_group(rt.stage.input, rt.stage.group)
    rt.set_ready(True)
    limits = Limits(vocab_size=engine.vocab_size, max_model_len=cfg.model.max_model_len)

    def score_group(g: pb.RolloutGroup) -> None:
        rewards = [float(v.reward) for v in g.verifier_results]
        texts = [c.text for c in g.completions]
        todo = rollouts_to_score(method, rewards)
        if method == "grpo":
            counters["skipped_method"] += len(rewards)
            m.skipped.labels(reason="method_grpo").inc(len(rewards))
        elif not todo:
            counters["skipped_uniform"] += len(rewards)
            m.skipped.labels(reason="uniform_rewards").inc(len(rewards))
        else:
            m.skipped.labels(reason="gate").inc(len(rewards) - len(todo))
        scores = [pb.TeacherScore(teacher_version=engine.version, context_kind=pb.CONTEXT_KIND_UNSPECIFIED,
                                  peer_index=-1) for _ in g.completions]
        jobs = []
        solution = g.problem.solution if g.problem.HasField("solution") else None
        for i in todo:
            ctx, kind, peer = choose_context(cfg.teacher.context, solution, texts, rewards, i)
            scores[i].context_kind = kind
            scores[i].peer_index = peer
            m.context.labels(kind=pb.ContextKind.Name(kind).removeprefix("CONTEXT_KIND_").lower()).inc()
            if ctx is None:
                counters["no_context"] += 1
                m.skipped.labels(reason="no_context").inc()
                continue
            jobs.append((i, teacher_prompt_ids(tok, g.problem.prompt, ctx, template=cfg.teacher.teacher_template)))
        bs = cfg.teacher.batch_size
        d_hats: list[torch.Tensor] = []
        d_bars: list[torch.Tensor] = []
        for s in range(0, len(jobs), bs):
            chunk = jobs[s:s + bs]
            idx = [i for i, _ in chunk]
            responses = [list(g.completions[i].token_ids) for i in idx]
            student, teacher = score_views(model, [list(g.prompt_ids)] * len(idx), [p for _, p in chunk], responses,
                                           temperature=1.0, topk=cfg.teacher.topk)
            for row, i in enumerate(idx):
                n = len(responses[row])
                sc = scores[i]
                sc.student_logprobs.extend(student.logprobs[row, :n].tolist())
                sc.teacher_logprobs.extend(teacher.logprobs[row, :n].tolist())
                d_hats.append(student.logprobs[row, :n] - teacher.logprobs[row, :n])
                if cfg.teacher.topk and student.topk_ids is not None and n:
                    d_bar = algorithms.position_asymmetry_topk(
                        student.topk_ids[row, :n], student.topk_logprobs[row, :n],
                        teacher.topk_ids[row, :n], teacher.topk_logprobs[row, :n])
                    sc.position_kl.extend(d_bar.tolist())
                    sc.position_kl_mean = float(d_bar.mean())
                    sc.position_kl_max = float(d_bar.max())
                    d_bars.append(d_bar)
                counters["scored"] += 1
                m.rollouts_scored.inc()
                m.scored_tokens.inc(n)
        _export_asymmetry(m, d_hats, d_bars)
        del g.teacher_scores[:]
        g.teacher_scores.extend(scores)

    def handle(g: pb.RolloutGroup) -> None:
        if len(g.verifier_results) != len(g.completions):
            raise ValueError(f"{len(g.completions)} completions but {len(g.verifier_results)} verifier results")
        t0 = time.perf_counter()
        with torch.no_grad():
            score_group(g)
        m.score_seconds.observe(time.perf_counter() - t0)
        g.timestamps.scored_at = time.time()

    def step() -> bool:
        sync.sync()
        return relay_groups(rt, count=4, handle=handle, counters=counters, limits=limits)

    try:
        # A failed batch leaves its entries pending for us: re-read them next round.
        rt.loop(step, on_error=rt.retry_pending())
    finally:
        sync.close()
        rt.close()
    return 0
