"""The teacher scorer's work on one group, as a library function the teacher service calls.

Student view P_S = π_θ(· | x, y<t), teacher view P_T = π_θ(· | x, c, y<t) (paper eq. 1), both
on the same weights. The method's spec (`rlrt_core.methods`) decides which completions are
scored (`rollouts_to_score`), the privileged context c (`choose_context`), and which extra rows
travel with the scores:

    teacher.topk > 0       D̄_t = KL(P_S || P_T) per token from both views' top-k rows (diagnostic)
    spec.needs_topk        the student's top-k ids (k = distill_topk) and log P_T at exactly those
                           ids, for the learner's logit-level distillation (SDPO/SRPO)
    spec.needs_teacher_entropy   the teacher view's full-vocabulary entropy per token (SRPO)

With a torch model everything is computed chunked (`rlrt_core.scoring.score_tokens`): no
[B, T, V] tensor is kept. With a scoring engine (`teacher.engine: vllm`, `VLLMEngine.score_tokens`,
prompt log-probs with prefix caching) the same outputs come from vLLM: log-probs of the sampled
tokens and top-k rows, so D̄_t too, but not the SDPO/SRPO rows (the config refuses those methods).
The service packs the result with `rlrt_core.transport.codec.set_rollout_scores`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlrt_core import algorithms
from rlrt_core.methods import MethodSpec, is_correct, rollouts_to_score
from rlrt_core.prompts import teacher_prompt_ids
from rlrt_core.scoring import score_tokens

__all__ = ["RolloutScore", "choose_context", "score_group"]


def choose_context(mode: str, solution: str | None, texts: Sequence[str], rewards: Sequence[float],
                   i: int) -> tuple[str | None, str, int]:
    """Privileged context for completion `i`: (text or None, kind "solution" | "peer" | "none", peer index or -1).

    "solution": the reference solution when present. "peer": the first correct completion other
    than `i` with non-empty text (deterministic; never the rollout itself). "solution_or_peer":
    the solution, else a peer."""
    if mode not in ("solution", "peer", "solution_or_peer"):
        raise ValueError(f"unknown teacher context {mode!r}; expected solution, peer or solution_or_peer")
    if mode in ("solution", "solution_or_peer") and solution:
        return solution, "solution", -1
    if mode in ("peer", "solution_or_peer"):
        for j, r in enumerate(rewards):
            if j != i and is_correct(r) and texts[j].strip():
                return texts[j], "peer", j
    return None, "none", -1


@dataclass
class RolloutScore:
    """Teacher-scorer output for one selected completion of n tokens (k = distill_topk).

    context_kind: "solution" | "peer" | "none" (no context: nothing scored, weight 1 / no target).
    peer_index: completion used as peer context, or -1.
    student_logprobs, teacher_logprobs: [n] float32 log-probs of the sampled tokens (None if "none").
    position_kl: [n] D̄_t from the top-k rows (teacher.topk > 0), else None.
    support_ids: [n, k] int64 the student view's top-k ids (spec.needs_topk), else None.
    teacher_support_logprobs: [n, k] float32 log P_T at support_ids, else None.
    teacher_entropy: [n] float32 entropy of P_T (spec.needs_teacher_entropy), else None.
    """

    context_kind: str
    peer_index: int = -1
    student_logprobs: Tensor | None = None
    teacher_logprobs: Tensor | None = None
    position_kl: Tensor | None = None
    support_ids: Tensor | None = None
    teacher_support_logprobs: Tensor | None = None
    teacher_entropy: Tensor | None = None

    @property
    def scored(self) -> bool:
        return self.student_logprobs is not None


def score_group(model: Any, tokenizer: Any, spec: MethodSpec, *, prompt_text: str, prompt_ids: Sequence[int],
                solution: str | None, completions_token_ids: Sequence[Sequence[int]],
                completion_texts: Sequence[str], rewards: Sequence[float], context: str, topk: int = 0,
                distill_topk: int = 100, teacher_template: str | None = None, batch_size: int = 16,
                temperature: float = 1.0) -> list[RolloutScore | None]:
    """Score the completions of one group that `spec` needs, without gradient.

    Args:
        model, tokenizer: the policy (teacher = student weights) and its tokenizer. `model` is a
            transformers causal LM, or an engine with `score_tokens(prompt_ids, response_ids,
            temperature=, topk=, with_entropy=, support_ids=) -> ScoreResult` and `vocab_size`
            (`VLLMEngine`): same outputs, computed by vLLM.
        spec: the method (`rlrt_core.methods.get_method(cfg.algorithm.method)`).
        prompt_text / prompt_ids: the problem's prompt as text (for the teacher prompt) and as the
            student prompt ids the completions were generated from.
        solution: the reference solution, or None.
        completions_token_ids, completion_texts, rewards: the K completions, their texts and rewards.
        context: "solution" | "peer" | "solution_or_peer" (`cfg.algorithm.teacher_context(cfg.teacher)`).
        topk: teacher.topk, top-k rows for D̄_t (0 = off).
        distill_topk: algorithm.distill_topk, support size for SDPO/SRPO (capped at the vocabulary).
        teacher_template: teacher.teacher_template; batch_size: teacher.batch_size.
        temperature: scoring temperature (1.0: the policy's own distribution).
    Returns:
        K entries: None for completions the method does not score, else a `RolloutScore`.
    """
    k = len(completions_token_ids)
    if len(completion_texts) != k or len(rewards) != k:
        raise ValueError(f"score_group: {k} completions, {len(completion_texts)} texts, {len(rewards)} rewards")
    if isinstance(model, torch.nn.Module):
        vocab = model.get_output_embeddings().weight.shape[0]

        def score(prompts: list[list[int]], responses: list[list[int]], **kw: Any) -> Any:
            return score_tokens(model, prompts, responses, **kw)
    else:
        vocab, score = model.vocab_size, model.score_tokens
    n_support = min(distill_topk, vocab) if spec.needs_topk else 0
    out: list[RolloutScore | None] = [None] * k
    jobs: list[tuple[int, list[int]]] = []
    for i in rollouts_to_score(spec, rewards):
        ctx, kind, peer = choose_context(context, solution, completion_texts, rewards, i)
        out[i] = RolloutScore(context_kind=kind, peer_index=peer)
        if ctx is not None:
            jobs.append((i, teacher_prompt_ids(tokenizer, prompt_text, ctx, template=teacher_template)))
    with torch.no_grad():
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s:s + batch_size]
            idx = [i for i, _ in chunk]
            responses = [list(completions_token_ids[i]) for i in idx]
            # Student top-k: max of the D̄_t rows and the distillation support (one pass).
            s_topk = max(topk, n_support)
            student = score([list(prompt_ids)] * len(idx), responses, temperature=temperature, topk=s_topk)
            support = student.topk_ids[..., :n_support] if n_support else None
            teacher = score([p for _, p in chunk], responses, temperature=temperature, topk=topk,
                            with_entropy=spec.needs_teacher_entropy, support_ids=support)
            for row, i in enumerate(idx):
                n = len(responses[row])
                sc = out[i]
                assert sc is not None
                sc.student_logprobs = student.logprobs[row, :n].float().cpu()
                sc.teacher_logprobs = teacher.logprobs[row, :n].float().cpu()
                if topk and n:
                    sc.position_kl = algorithms.position_asymmetry_topk(
                        student.topk_ids[row, :n, :topk], student.topk_logprobs[row, :n, :topk],
                        teacher.topk_ids[row, :n], teacher.topk_logprobs[row, :n]).float().cpu()
                if n_support:
                    sc.support_ids = support[row, :n].cpu()
                    sc.teacher_support_logprobs = teacher.support_logprobs[row, :n].float().cpu()
                if spec.needs_teacher_entropy:
                    sc.teacher_entropy = teacher.entropy[row, :n].float().cpu()
    return out
