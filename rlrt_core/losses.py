"""Policy losses, registered by name (the model: verl's `register_policy_loss`).

A loss is a pure function `fn(batch: LossBatch, cfg: AlgorithmConfig) -> (loss, metrics)`:
`loss` is a scalar tensor (the token mean over `batch.loss_mask` of one micro-batch; the learner
weights micro-batches by their share of the mini-batch's loss tokens), `metrics` a dict of
python floats that the learner writes to metrics.jsonl as "loss/<key>" (token-weighted mean
over the step; keys ending in _max/_min are reduced by max/min).

`LossSpec` also says what the learner must compute for the loss: π_old log-probs (a no-grad
pass before the update), the student's log-probs at the teacher's support ids (with grad), and
an optional `prepare(batch, cfg) -> batch` run once per PPO mini-batch on its detached inputs
(it sets `loss_mask`, the tokens the loss averages over, and any per-token constant such as
SRPO's normalised entropy weights, which are defined over the whole mini-batch).

Built-ins:
    ppo   PPO clip-higher + truncated IS (`algorithms.policy_loss`), GRPO / RLSD / RLRT
    sdpo  self-distillation (`algorithms.self_distillation_divergence`) on rollouts with a teacher
    srpo  GRPO loss on correct rollouts, entropy-weighted SDPO loss on failed rollouts with a teacher
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlrt_core.methods import correct_mask

if TYPE_CHECKING:  # torch is imported where a loss runs: config validation (launcher, verifier)
    from torch import Tensor  # reads only the registry and must not load it (~250 MB per process)

    from rlrt_core.config import AlgorithmConfig

__all__ = ["LossBatch", "LossFn", "LossSpec", "get_loss", "loss_names", "register_loss"]

# Same bound as policy_loss: importance ratios are computed from log-ratios clamped to it.
_MAX_LOG_RATIO = 20.0


@dataclass
class LossBatch:
    """Inputs of a loss for b rollouts padded to T tokens (k = support size).

    Set by the learner for the whole step (detached):
        mask [b,T] bool response tokens; rewards [b]; behavior_logprobs [b,T];
        token_advantages [b,T] (A_t of eq. 7, or A broadcast for methods without a weight);
        old_logprobs [b,T] π_old (None unless the loss needs it);
        support_ids [b,T,k] long and teacher_support_logprobs [b,T,k] (None unless needed);
        teacher_entropy [b,T] full-vocabulary entropy of P_T (None unless shipped);
        has_teacher [b] bool: rows that carry teacher rows (a distillation target).
    Set by the loss's `prepare` (per mini-batch): loss_mask [b,T] bool (default: mask);
        token_weight [b,T] per-token constant weight, or None.
    Set by the learner per micro-batch, with gradient: logprobs [b,T] log π_θ(y_t);
        entropy [b,T] (when entropy_coef > 0); support_logprobs [b,T,k] log π_θ at support_ids.
    """

    mask: Tensor
    rewards: Tensor
    behavior_logprobs: Tensor
    token_advantages: Tensor
    old_logprobs: Tensor | None = None
    support_ids: Tensor | None = None
    teacher_support_logprobs: Tensor | None = None
    teacher_entropy: Tensor | None = None
    has_teacher: Tensor | None = None
    loss_mask: Tensor | None = None
    token_weight: Tensor | None = None
    logprobs: Tensor | None = None
    entropy: Tensor | None = None
    support_logprobs: Tensor | None = None

    def rows(self, idx: list[int] | Tensor) -> "LossBatch":
        """The sub-batch of rows `idx` (every tensor field sliced on dim 0)."""
        import torch
        index = torch.as_tensor(idx, dtype=torch.long, device=self.mask.device)
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)
                                            if getattr(self, f.name) is not None})


LossFn = Callable[[LossBatch, "AlgorithmConfig"], "tuple[Tensor, dict[str, float]]"]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and what it needs from the learner."""

    name: str
    fn: LossFn
    needs_old_logprobs: bool = True
    needs_support: bool = False
    prepare: Callable[[LossBatch, "AlgorithmConfig"], LossBatch] | None = None

    def prepared(self, batch: LossBatch, cfg: "AlgorithmConfig") -> LossBatch:
        """`batch` with loss_mask (and what `prepare` adds) set."""
        batch = dataclasses.replace(batch, loss_mask=batch.mask)
        return self.prepare(batch, cfg) if self.prepare is not None else batch


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, needs_old_logprobs: bool = True, needs_support: bool = False,
                  prepare: Callable[[LossBatch, "AlgorithmConfig"], LossBatch] | None = None
                  ) -> Callable[[LossFn], LossFn]:
    """Decorator: register `fn(batch, cfg) -> (loss, metrics)` as loss `name` (once)."""

    def deco(fn: LossFn) -> LossFn:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[name] = LossSpec(name, fn, needs_old_logprobs=needs_old_logprobs, needs_support=needs_support,
                                 prepare=prepare)
        return fn

    return deco


def get_loss(name: str) -> LossSpec:
    """The loss registered as `name`; ValueError listing the registered losses otherwise."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered losses: {', '.join(sorted(_LOSSES))}")
    return _LOSSES[name]


def loss_names() -> tuple[str, ...]:
    return tuple(_LOSSES)


# --------------------------------------------------------------------------------------
# PPO clip-higher + truncated IS (GRPO, RLSD, RLRT; Table 5)
# --------------------------------------------------------------------------------------


@register_loss("ppo")
def ppo_loss(batch: LossBatch, cfg: "AlgorithmConfig") -> tuple[Tensor, dict[str, float]]:
    """`algorithms.policy_loss` on the shaped token advantages (token mean over the mask),
    minus entropy_coef x token-mean entropy when the coefficient is > 0 (GRPO + EB)."""
    from rlrt_core import algorithms
    assert batch.logprobs is not None and batch.old_logprobs is not None
    return algorithms.policy_loss(
        batch.logprobs, batch.old_logprobs, batch.token_advantages, batch.mask, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, behavior_logprobs=batch.behavior_logprobs, is_cap=cfg.is_cap,
        dual_clip=cfg.dual_clip, entropy=batch.entropy, entropy_coef=cfg.entropy_coef)


# --------------------------------------------------------------------------------------
# Self-distillation (SDPO) and its sample-routed combination with GRPO (SRPO)
# --------------------------------------------------------------------------------------


def _distill_terms(batch: LossBatch, cfg: "AlgorithmConfig", rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token SDPO loss [b,T] (0 outside `rows` x mask), its IS ratio and the token mask.

        l_t = D_alpha(P_S || P_T on the support)_t * sg(min(pi_theta(y_t) / pi_behaviour(y_t), is_clip))

    as the SDPO reference (lasgroup/SDPO `compute_self_distillation_loss`, is_clip = 2)."""
    import torch
    from rlrt_core import algorithms
    assert batch.support_logprobs is not None and batch.teacher_support_logprobs is not None
    assert batch.logprobs is not None
    tokens = batch.mask & rows[:, None]
    zeros = torch.zeros_like(batch.logprobs)
    # Rows without a teacher carry placeholder support rows: keep them out of the forward and
    # the gradient (where, not multiply).
    sel = tokens[..., None]
    student = torch.where(sel, batch.support_logprobs, torch.zeros_like(batch.support_logprobs))
    teacher = torch.where(sel, batch.teacher_support_logprobs.detach().to(student.dtype), torch.zeros_like(student))
    div = algorithms.self_distillation_divergence(student, teacher, alpha=cfg.distill_alpha,
                                                  add_tail=cfg.distill_add_tail, kl_clip=cfg.distill_kl_clip)
    with torch.no_grad():
        if cfg.distill_is_clip is not None:
            log_ratio = torch.where(tokens, batch.logprobs.detach() - batch.behavior_logprobs, zeros)
            ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)).clamp(max=cfg.distill_is_clip)
        else:
            ratio = torch.ones_like(zeros)
    return torch.where(tokens, div * ratio, zeros), ratio, tokens


def _token_mean(x: Tensor, where: Tensor) -> float:
    import torch
    n = int(where.sum())
    return float(torch.where(where, x.detach(), torch.zeros_like(x)).sum()) / n if n else 0.0


def _sdpo_prepare(batch: LossBatch, cfg: "AlgorithmConfig") -> LossBatch:
    # SDPO averages over the tokens of rollouts that have a teacher (its self_distillation_mask).
    assert batch.has_teacher is not None
    return dataclasses.replace(batch, loss_mask=batch.mask & batch.has_teacher[:, None])


@register_loss("sdpo", needs_old_logprobs=False, needs_support=True, prepare=_sdpo_prepare)
def sdpo_loss(batch: LossBatch, cfg: "AlgorithmConfig") -> tuple[Tensor, dict[str, float]]:
    """SDPO (Hübotter et al. 2026, arXiv 2601.20802; RLRT paper App. G.1): pull P_S toward P_T
    on every rollout that has a teacher (all rollouts of groups with a successful one):

        loss = sum_t l_t / |tokens with a teacher|  -  entropy_coef * token-mean entropy

    with l_t from `_distill_terms` (generalised JS with alpha = distill_alpha over the student's
    top-k support plus a tail bucket, IS-clipped at distill_is_clip against the behaviour policy).

    One difference from the SDPO reference, which takes the top-k of the student in the update's
    own forward pass: here the support ids are the student's top-k under the teacher scorer's
    weights (at most max_staleness versions old) and ship with the teacher's log-probs, so the
    teacher never needs the learner's weights; the student side at those ids is recomputed with
    gradient. The IS weight is pi_theta / pi_behaviour (the reference uses pi_old, equal to the
    behaviour policy on-policy), so SDPO needs no pi_old pass."""
    import torch
    assert batch.has_teacher is not None and batch.loss_mask is not None
    per_token, ratio, tokens = _distill_terms(batch, cfg, batch.has_teacher)
    n = int(tokens.sum())
    distill = per_token.sum() / max(n, 1)
    loss = distill
    metrics: dict[str, float] = {}
    if batch.entropy is not None and cfg.entropy_coef > 0:
        ent = torch.where(tokens, batch.entropy, torch.zeros_like(batch.entropy)).sum() / max(n, 1)
        loss = loss - cfg.entropy_coef * ent
        metrics["entropy"] = float(ent.detach())
    metrics.update({"loss": float(loss.detach()), "distill": float(distill.detach()),
                    "distill_is_ratio_mean": _token_mean(ratio, tokens),
                    "distill_is_clip_frac": _token_mean((ratio >= (cfg.distill_is_clip or math.inf)).float(), tokens)})
    return loss, metrics


def _srpo_routes(batch: LossBatch) -> Tensor:
    """[b] bool: rows routed to the SDPO branch, z_SDPO = (1 - c_i) m_i (SRPO eq. in sec. 3.1)."""
    assert batch.has_teacher is not None
    return ~correct_mask(batch.rewards) & batch.has_teacher


def _srpo_prepare(batch: LossBatch, cfg: "AlgorithmConfig") -> LossBatch:
    """Entropy-aware weights over the mini-batch's SDPO tokens Omega (SRPO sec. 3.2):
    w~_t = exp(-beta H_t), w_t = w~_t / mean_Omega(w~); every valid token counts in the
    denominator (sec. 3.3: the union of both branches' tokens)."""
    import torch
    sdpo_tokens = batch.mask & _srpo_routes(batch)[:, None]
    weight = torch.ones_like(batch.behavior_logprobs)
    if bool(sdpo_tokens.any()):
        if batch.teacher_entropy is None:
            raise ValueError("srpo needs the teacher's per-token entropy (teacher_entropy) for its SDPO rows")
        raw = torch.exp(-cfg.srpo_beta * batch.teacher_entropy.to(weight.dtype))
        mean = raw[sdpo_tokens].mean()
        weight = torch.where(sdpo_tokens, raw / mean, weight)
    return dataclasses.replace(batch, loss_mask=batch.mask, token_weight=weight)


@register_loss("srpo", needs_old_logprobs=True, needs_support=True, prepare=_srpo_prepare)
def srpo_loss(batch: LossBatch, cfg: "AlgorithmConfig") -> tuple[Tensor, dict[str, float]]:
    """SRPO (Li et al. 2026, "Unifying Group-Relative and Self-Distillation Policy Optimization
    via Sample Routing", arXiv 2604.02288, sec. 3):

        z_i^SDPO = (1 - c_i) m_i,   z_i^GRPO = 1 - z_i^SDPO       c: correct, m: has a teacher
        L = [sum z^GRPO l^GRPO_t + sum z^SDPO w_t l^SDPO_t] / [sum z^GRPO + sum z^SDPO]   (tokens)
        w_t = exp(-beta H_t) / mean over the SDPO tokens of exp(-beta H)   (H: teacher entropy)

    l^GRPO is the PPO clip-higher + truncated-IS token loss on the (unshaped) GRPO advantage,
    l^SDPO the SDPO token loss of `sdpo_loss`; beta = srpo_beta (the RLRT paper sweeps
    {0, 0.5, 1}; SRPO's own default is 1). The weights come from `_srpo_prepare`."""
    from rlrt_core import algorithms
    assert batch.token_weight is not None and batch.logprobs is not None and batch.old_logprobs is not None
    to_sdpo = _srpo_routes(batch)
    grpo_mask = batch.mask & ~to_sdpo[:, None]
    n = max(int(batch.mask.sum()), 1)
    pg, pg_met = algorithms.policy_loss(
        batch.logprobs, batch.old_logprobs, batch.token_advantages, grpo_mask, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, behavior_logprobs=batch.behavior_logprobs, is_cap=cfg.is_cap,
        dual_clip=cfg.dual_clip, entropy=batch.entropy, entropy_coef=cfg.entropy_coef, num_tokens=float(n))
    per_token, ratio, tokens = _distill_terms(batch, cfg, to_sdpo)
    distill = (per_token * batch.token_weight).sum() / n
    loss = pg + distill
    metrics = {k: v for k, v in pg_met.items() if k not in ("loss", "n_tokens")}
    metrics.update({"loss": float(loss.detach()), "distill": float(distill.detach()),
                    "sdpo_token_frac": float(tokens.sum()) / n,
                    "distill_is_ratio_mean": _token_mean(ratio, tokens),
                    "dw_weight_max": float(batch.token_weight[tokens].max()) if bool(tokens.any()) else 1.0})
    return loss, metrics
