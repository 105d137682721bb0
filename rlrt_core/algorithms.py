"""RLRT algorithm core: group advantages, token-level reweighting, PPO surrogate, diagnostics.

Pure functions on torch tensors, written to be read top to bottom next to the paper
(Kim, Jeon, Li, Yang 2026, "Rebellious Student", arXiv 2605.10781). Notation:

    P_S = pi(. | x, y<t)        student view              (eq. 1)
    P_T = pi(. | x, c, y<t)     teacher view, privileged c (eq. 1)
    D_hat_t = log P_S(y_t) - log P_T(y_t)   token-level information asymmetry (eq. 3)
    D_bar_t = KL(P_S || P_T)                position-level information asymmetry (eq. 3)

Every method of the GRPO family shares one shaping rule (Table 4, eq. 7)

    A_t = A * [(1 - lam) + lam * clip(w_t, 1 - eps_w, 1 + eps_w)]     on gated rollouts
    A_t = A                                                          elsewhere

and differs only in the per-token weight w_t and the gate:

    grpo      w_t = 1                                  (no teacher)
    rlsd      w_t = exp(sign(A) * (log P_T - log P_S)) all rollouts   (eq. 2)
    rlrt      w_t = exp(sign(A) * D_hat_t)             only r = 1     (eqs. 6, 7)
    rlrt_all  w_t = exp(sign(A) * D_hat_t)             all rollouts   (ablation, sec. 6.5)

A method's weight is one function `(advantages [B], rewards [B], student_logprobs [B,T],
teacher_logprobs [B,T] | None) -> (weight [B,T], gate [B] bool)`; the weight functions and the
method specs (loss, teacher needs, defaults) live in `rlrt_core.methods`, the losses in
`rlrt_core.losses`. `self_distillation_divergence` is SDPO's logit-level divergence.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rlrt_core.methods import CORRECT_REWARD, WeightFn, correct_mask, get_method, register_method, weight_functions

__all__ = [
    "ADVANTAGE_METHODS",
    "ADVANTAGE_REGISTRY",
    "CORRECT_REWARD",
    "METHODS",
    "WeightFn",
    "asymmetry_summary",
    "group_advantages",
    "method_needs_teacher",
    "mixing_schedule",
    "policy_loss",
    "position_asymmetry",
    "position_asymmetry_topk",
    "register_method",
    "self_distillation_divergence",
    "token_advantages",
    "token_asymmetry",
    "upweighted_fraction",
]

# PPO log-ratios are clamped to this range before exp() so one wild token cannot make the
# loss inf (verl does the same); a ratio of e^20 is far outside any trust region anyway.
_MAX_LOG_RATIO = 20.0
# Smallest teacher probability position_asymmetry_topk assumes for a token outside the
# teacher's top-k: below float32 resolution of the teacher's tail mass.
_TOPK_TEACHER_FLOOR = 1e-8


# --------------------------------------------------------------------------------------
# Input validation: bad input is a ValueError that names the argument, never a NaN later.
# --------------------------------------------------------------------------------------


def _check_finite(name: str, t: Tensor, where: Tensor | None = None) -> None:
    """Raise ValueError if `t` holds NaN/inf (only at positions where `where` is True)."""
    bad = ~torch.isfinite(t)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        n = int(bad.sum())
        raise ValueError(f"{name} contains {n} non-finite value(s) (NaN or inf)")


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}"
        )


def _check_ndim(name: str, t: Tensor, ndim: int, what: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {what}, got shape {tuple(t.shape)}")


def _as_mask(mask: Tensor) -> Tensor:
    """Accept bool or 0/1 numeric masks; return bool."""
    return mask if mask.dtype == torch.bool else mask != 0


def _float_dtype(*ts: Tensor | None) -> torch.dtype:
    """Compute dtype: at least float32 (bf16 inputs are upcast), float64 if any input is."""
    dtype = torch.float32
    for t in ts:
        if t is not None and t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def _check_unit_interval(name: str, x: float) -> None:
    if not (isinstance(x, (int, float)) and math.isfinite(x) and 0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")


# --------------------------------------------------------------------------------------
# Group-relative advantage (GRPO; Dr.GRPO without std normalisation)
# --------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, *, norm_by_std: bool, eps: float = 1e-6) -> Tensor:
    """Group-relative advantage of K rollouts per prompt.

    A^(k) = r^(k) - mean_k r                      (Dr.GRPO; the paper's GRPO, Table 5)
    A^(k) = (r^(k) - mean_k r) / (std_k r + eps)  (RLSD/RLRT, "group-standardised", sec. 5)

    std uses Bessel's correction (as `torch.std`). A group whose rewards are all identical
    (including K = 1) gets exactly 0: it carries no learning signal, and this avoids 0/0.

    Args:
        rewards: [G, K] float rewards, G groups of K rollouts.
        norm_by_std: divide by the group std.
        eps: added to the std (>= 0).
    Returns:
        [G, K] advantages, same dtype as rewards (float32 for integer rewards).
    """
    _check_ndim("rewards", rewards, 2, "a [G, K] tensor (groups x rollouts)")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float32)
    _check_finite("rewards", rewards)
    rewards = rewards.detach()

    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    # Exact zero for degenerate groups: mean() of identical floats need not round back exactly.
    degenerate = (rewards == rewards[:, :1]).all(dim=-1, keepdim=True)
    centered = torch.where(degenerate, torch.zeros_like(centered), centered)
    if not norm_by_std:
        return centered
    if rewards.shape[-1] < 2:  # std of one sample is undefined; the group is degenerate anyway
        return centered
    std = rewards.std(dim=-1, keepdim=True)
    denom = torch.where(degenerate, torch.ones_like(std), std + eps)
    return centered / denom


# --------------------------------------------------------------------------------------
# Method registry: per-token weight w_t and trajectory gate (Table 4) live in
# rlrt_core.methods as `MethodSpec`s; these names are kept for existing callers.
# --------------------------------------------------------------------------------------

# name -> weight function of every registered spec that has one (a live view of the registry).
ADVANTAGE_METHODS = weight_functions
ADVANTAGE_REGISTRY = ADVANTAGE_METHODS  # name used in the interface notes; same object


def method_needs_teacher(method: str) -> bool:
    """Whether `method` reads teacher log-probs (its spec scores some rollouts)."""
    return _spec(method).needs_teacher


def _spec(method: str):
    try:
        return get_method(method)
    except ValueError as err:  # the message lists the registered names
        raise ValueError(f"unknown advantage {str(err).removeprefix('unknown ')}") from None


def _check_method(method: str) -> None:
    spec = _spec(method)
    if spec.weight is None:
        raise ValueError(f"method {method!r} has no token weight (its loss {spec.loss!r} does not shape advantages)")


# The GRPO-family shaping methods of Table 4 (property tests sweep these).
METHODS: tuple[str, ...] = ("grpo", "rlsd", "rlrt", "rlrt_all")


def _validated_token_inputs(
    method: str,
    advantages: Tensor,
    rewards: Tensor,
    student_logprobs: Tensor,
    teacher_logprobs: Tensor | None,
    mask: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Validate and return (A, r, logP_S, logP_T, mask) detached, in a float compute dtype."""
    _check_method(method)
    _check_ndim("student_logprobs", student_logprobs, 2, "a [B, T] tensor")
    _check_ndim("advantages", advantages, 1, "a [B] tensor (one advantage per rollout)")
    _check_ndim("rewards", rewards, 1, "a [B] tensor (one reward per rollout)")
    _check_ndim("mask", mask, 2, "a [B, T] tensor")
    _check_same_shape("student_logprobs", student_logprobs, "mask", mask)
    batch = student_logprobs.shape[0]
    if advantages.shape[0] != batch:
        raise ValueError(
            f"shape mismatch: advantages has shape {tuple(advantages.shape)} but student_logprobs "
            f"has shape {tuple(student_logprobs.shape)} (need advantages [B] with B = {batch})"
        )
    _check_same_shape("advantages", advantages, "rewards", rewards)
    if teacher_logprobs is None:
        if method_needs_teacher(method):
            raise ValueError(f"method {method!r} needs teacher_logprobs; only teacher-free methods run without")
    else:
        _check_ndim("teacher_logprobs", teacher_logprobs, 2, "a [B, T] tensor")
        _check_same_shape("student_logprobs", student_logprobs, "teacher_logprobs", teacher_logprobs)

    dtype = _float_dtype(advantages, student_logprobs, teacher_logprobs)
    mask = _as_mask(mask.detach())
    adv = advantages.detach().to(dtype)
    rew = rewards.detach().to(dtype)
    student = student_logprobs.detach().to(dtype)
    teacher = None if teacher_logprobs is None else teacher_logprobs.detach().to(dtype)
    _check_finite("advantages", adv)
    _check_finite("rewards", rew)
    # Padding may hold anything (0, -inf): only valid positions must be finite. Zero the
    # rest so exp() below never sees it.
    _check_finite("student_logprobs", student, mask)
    student = torch.where(mask, student, torch.zeros_like(student))
    if teacher is not None:
        _check_finite("teacher_logprobs", teacher, mask)
        teacher = torch.where(mask, teacher, torch.zeros_like(teacher))
    return adv, rew, student, teacher, mask


def token_advantages(
    method: str,
    advantages: Tensor,
    rewards: Tensor,
    student_logprobs: Tensor,
    teacher_logprobs: Tensor | None,
    mask: Tensor,
    *,
    lam: float,
    eps_w: float,
) -> Tensor:
    """Per-token advantages of the GRPO family (eq. 7, Table 4).

        A_t = A * [(1 - lam) + lam * clip(w_t, 1 - eps_w, 1 + eps_w)]   gated rows
        A_t = A                                                         other rows

    w_t and the gate come from the method's spec (`rlrt_core.methods.get_method(method).weight`). Everything is computed without
    gradient (stop-gradient on D_hat_t). sign(0) = 0, so rows with A = 0 stay 0. Since
    w_t > 0, |A_t - A| <= lam * eps_w * |A|.

    Args:
        method: one of METHODS ("grpo", "rlsd", "rlrt", "rlrt_all").
        advantages: [B] group advantage A per rollout.
        rewards: [B] reward per rollout (RLRT gates on r == 1).
        student_logprobs: [B, T] log P_S(y_t).
        teacher_logprobs: [B, T] log P_T(y_t); may be None only for "grpo".
        mask: [B, T] bool (or 0/1), True on response tokens.
        lam: mixing strength lambda in [0, 1] (0 = GRPO).
        eps_w: clip radius of the weight, >= 0.
    Returns:
        [B, T] token advantages, 0 at masked positions.
    """
    _check_unit_interval("lam", lam)
    if not (isinstance(eps_w, (int, float)) and math.isfinite(eps_w) and eps_w >= 0.0):
        raise ValueError(f"eps_w must be a finite number >= 0, got {eps_w!r}")
    with torch.no_grad():
        adv, rew, student, teacher, mask = _validated_token_inputs(
            method, advantages, rewards, student_logprobs, teacher_logprobs, mask
        )
        weight, gate = get_method(method).weight(adv, rew, student, teacher)
        # Clip before mixing: the clipped weight is finite even if exp() overflowed,
        # so lam = 0 gives exactly 1 * A.
        mixed = (1.0 - lam) + lam * weight.clamp(1.0 - eps_w, 1.0 + eps_w)
        factor = torch.where(gate[:, None], mixed, torch.ones_like(mixed))
        out = adv[:, None] * factor
        return torch.where(mask, out, torch.zeros_like(out))


def mixing_schedule(step: int, *, lam_init: float, decay_steps: int | None) -> float:
    """Mixing strength lambda at optimiser step `step` (Table 5, "mixing decay steps").

    lam(step) = lam_init * max(0, 1 - step / decay_steps): lam_init at step 0, 0 from step
    `decay_steps` on; constant lam_init when decay_steps is None (base models).
    """
    _check_unit_interval("lam_init", lam_init)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if decay_steps is None:
        return float(lam_init)
    if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
        raise ValueError(f"decay_steps must be None or an int >= 1, got {decay_steps!r}")
    return float(lam_init) * max(0.0, 1.0 - step / decay_steps)


# --------------------------------------------------------------------------------------
# PPO clip-higher surrogate with truncated IS (DAPO recipe; Table 5)
# --------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    token_advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    behavior_logprobs: Tensor | None = None,
    is_cap: float | None = 2.0,
    dual_clip: float | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clip-higher policy loss, token-mean aggregated, with truncated importance sampling.

        ratio_t = exp(log pi_theta(y_t) - log pi_old(y_t))
        L_t     = -min(ratio_t * A_t, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_t)
        L_t     = min(L_t, dual_clip * |A_t|)            if dual_clip and A_t < 0
        L_t    *= sg(min(exp(log pi_old - log pi_behaviour), is_cap))   if behaviour given
        loss    = sum_t L_t m_t / sum_t m_t  -  entropy_coef * token-mean(entropy)

    pi_old is the learner's policy before this update; pi_behaviour the engine's policy at
    sampling time (they differ under async staleness and engine numerics). The IS weight is
    detached; with `is_cap=None` it is not truncated (only bounded at e^20 against overflow).
    Log-ratios are clamped to [-20, 20] before exp().

    Args:
        logprobs: [B, T] log pi_theta(y_t), with grad.
        old_logprobs: [B, T] log pi_old(y_t) (detached here).
        token_advantages: [B, T] A_t (detached here).
        mask: [B, T] bool (or 0/1) response-token mask.
        eps_low, eps_high: clip range (DAPO clip-higher: 0.2, 0.28).
        behavior_logprobs: [B, T] log pi_behaviour(y_t), or None (no IS correction).
        is_cap: truncation C of the IS weight (paper: 2), or None.
        dual_clip: c > 1 caps the loss of A < 0 tokens at c * |A| (dual-clip PPO), or None.
        entropy: [B, T] per-token entropy with grad, for the GRPO + entropy bonus baseline.
        entropy_coef: bonus coefficient (>= 0); > 0 requires `entropy`.
        num_tokens: denominator of the token mean; default sum(mask). Pass the token count
            of the whole mini-batch when accumulating gradients over micro-batches.
    Returns:
        (loss scalar tensor, metrics of python floats). An all-masked batch gives loss 0
        (still attached to the graph), never NaN. Fractions are over valid tokens.
        approx_kl is the k3 estimator of KL(pi_old || pi_theta) on tokens sampled from
        pi_old: mean((ratio - 1) - log ratio), ratio = pi_theta / pi_old (>= 0 per token).
    """
    _check_ndim("logprobs", logprobs, 2, "a [B, T] tensor")
    for name, t in (("old_logprobs", old_logprobs), ("token_advantages", token_advantages), ("mask", mask)):
        _check_ndim(name, t, 2, "a [B, T] tensor")
        _check_same_shape("logprobs", logprobs, name, t)
    if behavior_logprobs is not None:
        _check_ndim("behavior_logprobs", behavior_logprobs, 2, "a [B, T] tensor")
        _check_same_shape("logprobs", logprobs, "behavior_logprobs", behavior_logprobs)
    if entropy is not None:
        _check_ndim("entropy", entropy, 2, "a [B, T] tensor")
        _check_same_shape("logprobs", logprobs, "entropy", entropy)
    if not (math.isfinite(eps_low) and 0.0 <= eps_low < 1.0):
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low!r}")
    if not (math.isfinite(eps_high) and eps_high >= 0.0):
        raise ValueError(f"eps_high must be finite and >= 0, got {eps_high!r}")
    if is_cap is not None and not (math.isfinite(is_cap) and is_cap > 0.0):
        raise ValueError(f"is_cap must be None or a finite number > 0, got {is_cap!r}")
    if dual_clip is not None and not (math.isfinite(dual_clip) and dual_clip > 1.0):
        raise ValueError(f"dual_clip must be None or a finite number > 1, got {dual_clip!r}")
    if not (math.isfinite(entropy_coef) and entropy_coef >= 0.0):
        raise ValueError(f"entropy_coef must be finite and >= 0, got {entropy_coef!r}")
    if entropy_coef > 0.0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs the per-token entropy tensor")
    if num_tokens is not None and not (math.isfinite(num_tokens) and num_tokens > 0):
        raise ValueError(f"num_tokens must be None or > 0, got {num_tokens!r}")

    mask = _as_mask(mask.detach())
    _check_finite("logprobs", logprobs.detach(), mask)
    _check_finite("old_logprobs", old_logprobs.detach(), mask)
    _check_finite("token_advantages", token_advantages.detach(), mask)
    if behavior_logprobs is not None:
        _check_finite("behavior_logprobs", behavior_logprobs.detach(), mask)
    if entropy is not None:
        _check_finite("entropy", entropy.detach(), mask)

    zeros = torch.zeros_like(logprobs)  # no grad of its own
    adv = torch.where(mask, token_advantages.detach().to(logprobs.dtype), zeros)
    # where() (not multiply) keeps garbage at padding out of the forward and the gradient.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), zeros)
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)

    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)  # = -min(ratio A, clip(ratio) A)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)

    with torch.no_grad():
        if behavior_logprobs is not None:
            log_is = torch.where(mask, old_logprobs.detach() - behavior_logprobs.detach(), zeros)
            cap_log = math.log(is_cap) if is_cap is not None else _MAX_LOG_RATIO
            is_weight = torch.exp(log_is.clamp(max=cap_log))
            is_truncated = (log_is > cap_log) & mask
        else:
            is_weight = torch.ones_like(ratio)
            is_truncated = torch.zeros_like(mask)

    per_token = torch.where(mask, pg * is_weight, zeros)
    n_valid = mask.sum()
    denom = float(num_tokens) if num_tokens is not None else max(int(n_valid), 1)
    pg_loss = per_token.sum() / denom
    loss = pg_loss
    ent_sum = None
    if entropy is not None:
        ent_sum = torch.where(mask, entropy, torch.zeros_like(entropy)).sum()
        if entropy_coef > 0.0:
            loss = loss - entropy_coef * ent_sum / denom

    with torch.no_grad():
        n = max(int(n_valid), 1)
        clip_high = (adv > 0) & (ratio > 1.0 + eps_high) & mask
        clip_low = (adv < 0) & (ratio < 1.0 - eps_low) & mask
        dual = (adv < 0) & mask & (ratio > dual_clip) if dual_clip is not None else torch.zeros_like(mask)
        valid_ratio = ratio[mask]
        k3 = (ratio - 1.0) - log_ratio
        metrics: dict[str, float] = {
            "loss": float(loss.detach()),
            "pg_loss": float(pg_loss.detach()),
            "n_tokens": float(n_valid),
            "clip_frac_low": float(clip_low.sum()) / n,
            "clip_frac_high": float(clip_high.sum()) / n,
            "clip_frac": float((clip_low | clip_high | dual).sum()) / n,
            "dual_clip_frac": float(dual.sum()) / n,
            "ratio_mean": float(valid_ratio.mean()) if valid_ratio.numel() else 1.0,
            "ratio_max": float(valid_ratio.max()) if valid_ratio.numel() else 1.0,
            "ratio_min": float(valid_ratio.min()) if valid_ratio.numel() else 1.0,
            "approx_kl": float(torch.where(mask, k3, torch.zeros_like(k3)).sum()) / n,
            "is_weight_mean": float(is_weight[mask].mean()) if valid_ratio.numel() else 1.0,
            "is_weight_max": float(is_weight[mask].max()) if valid_ratio.numel() else 1.0,
            "is_truncated_frac": float(is_truncated.sum()) / n,
        }
        if ent_sum is not None:
            metrics["entropy"] = float(ent_sum) / n  # token mean of this batch, whatever num_tokens
    return loss, metrics


# --------------------------------------------------------------------------------------
# Self-distillation divergence (SDPO, Hübotter et al. 2026, arXiv 2601.20802)
# --------------------------------------------------------------------------------------


def _with_tail(logp: Tensor) -> Tensor:
    """Append log(1 - sum exp(logp)) as one extra category (the mass outside the support).

    The log-sum-exp is capped just below 0 so a support holding (numerically) all the mass
    gets a tiny, finite tail rather than log(0) (as the SDPO reference code does)."""
    tiny = torch.finfo(logp.dtype).eps
    log_s = torch.logsumexp(logp, dim=-1, keepdim=True).clamp(max=math.log1p(-tiny))
    return torch.cat([logp, torch.log(-torch.expm1(log_s))], dim=-1)


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) over the last axis from (floored, finite) log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def self_distillation_divergence(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    *,
    alpha: float,
    add_tail: bool = True,
    kl_clip: float | None = None,
) -> Tensor:
    """SDPO's logit-level divergence between the student and teacher views on a top-k support.

    Both inputs are log-probabilities (full-vocabulary normalised) of the SAME k support
    tokens per position (SDPO: the student's top-k). With `add_tail` a (k+1)-th category
    log(1 - sum_k p) holds the remaining mass on each side; otherwise both are renormalised
    over the k. Then, with P_S, P_T the resulting distributions,

        alpha = 0      KL(P_T || P_S)                                   (forward KL)
        alpha = 1      KL(P_S || P_T)                                   (reverse KL)
        otherwise      alpha KL(P_T || M) + (1 - alpha) KL(P_S || M),   M = (1 - alpha) P_S + alpha P_T

    the generalised Jensen-Shannon divergence of the SDPO reference implementation
    (lasgroup/SDPO `compute_self_distillation_loss`; Table 5 of the RLRT paper: JS, alpha = 0.5,
    top-k 100). `kl_clip` caps the divergence per position (gradient 0 where capped).

    Numerics: computed in float32 (float64 if an input is); log-probs are floored at
    log(smallest normal float) so -inf (a token one view deems impossible) gives a large finite
    divergence and finite gradients, never inf/NaN; the tail mass is kept >= machine epsilon.

    Args:
        student_logprobs: [..., k] log P_S at the support ids (with grad in the learner).
        teacher_logprobs: [..., k] log P_T at the same ids (a target: detach it yourself).
        alpha: interpolation in [0, 1].
        add_tail: add the tail category (True) or renormalise over the k (False).
        kl_clip: None or a cap > 0 per position.
    Returns:
        [...] divergence per position, >= 0.
    """
    _check_same_shape("student_logprobs", student_logprobs, "teacher_logprobs", teacher_logprobs)
    if student_logprobs.ndim < 1 or student_logprobs.shape[-1] < 1:
        raise ValueError(f"support log-probs need a k dimension >= 1, got shape {tuple(student_logprobs.shape)}")
    _check_unit_interval("alpha", alpha)
    if kl_clip is not None and not (isinstance(kl_clip, (int, float)) and math.isfinite(kl_clip) and kl_clip > 0):
        raise ValueError(f"kl_clip must be None or a finite number > 0, got {kl_clip!r}")
    _check_rows("student_logprobs", student_logprobs.detach())
    _check_rows("teacher_logprobs", teacher_logprobs.detach())
    dtype = _float_dtype(student_logprobs, teacher_logprobs)
    floor = math.log(torch.finfo(dtype).tiny)
    s = student_logprobs.to(dtype).clamp_min(floor)
    t = teacher_logprobs.to(dtype).clamp_min(floor)
    if add_tail:
        s, t = _with_tail(s), _with_tail(t)
    else:
        s = s - torch.logsumexp(s, dim=-1, keepdim=True)
        t = t - torch.logsumexp(t, dim=-1, keepdim=True)
    s, t = s.clamp_min(floor), t.clamp_min(floor)
    if alpha == 0.0:
        div = _kl_terms(t, s)
    elif alpha == 1.0:
        div = _kl_terms(s, t)
    else:
        log_m = torch.logsumexp(torch.stack([s + math.log(1.0 - alpha), t + math.log(alpha)]), dim=0)
        div = alpha * _kl_terms(t, log_m) + (1.0 - alpha) * _kl_terms(s, log_m)
    div = div.clamp_min(0.0)
    if kl_clip is not None:
        div = div.clamp(max=kl_clip)
    return div


# --------------------------------------------------------------------------------------
# Information-asymmetry diagnostics (eq. 3, sec. 4)
# --------------------------------------------------------------------------------------


def token_asymmetry(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Token-level information asymmetry D_hat_t = log P_S(y_t) - log P_T(y_t) (eq. 3).

    Detached (stop-gradient). D_hat_t > 0: the student chose against the teacher's
    prediction (explore); < 0: the teacher would have predicted it (exploit), sec. 4.3.

    Args:
        student_logprobs, teacher_logprobs: [B, T] log-probs of the sampled tokens.
        mask: optional [B, T] bool; masked positions give 0.
    Returns:
        [B, T] D_hat_t.
    """
    _check_same_shape("student_logprobs", student_logprobs, "teacher_logprobs", teacher_logprobs)
    if mask is None:
        mask = torch.ones_like(student_logprobs, dtype=torch.bool)
    _check_same_shape("student_logprobs", student_logprobs, "mask", mask)
    mask = _as_mask(mask.detach())
    _check_finite("student_logprobs", student_logprobs.detach(), mask)
    _check_finite("teacher_logprobs", teacher_logprobs.detach(), mask)
    d_hat = (student_logprobs.detach() - teacher_logprobs.detach()).to(_float_dtype(student_logprobs))
    return torch.where(mask, d_hat, torch.zeros_like(d_hat))


def _check_rows(name: str, t: Tensor) -> None:
    # -inf is a legitimate log-prob (probability 0); NaN and +inf are not.
    if bool(torch.isnan(t).any()) or bool(torch.isposinf(t).any()):
        raise ValueError(f"{name} contains NaN or +inf")


def position_asymmetry(student_row_logprobs: Tensor, teacher_row_logprobs: Tensor) -> Tensor:
    """Position-level asymmetry D_bar_t = KL(P_S || P_T) = sum_v P_S(v) (log P_S(v) - log P_T(v)) (eq. 3).

    Rows are full-vocabulary log-probabilities (logits are accepted too: each row is
    re-normalised with log_softmax, a no-op on proper log-probs). Tokens with P_S(v) = 0
    contribute 0; P_S(v) > 0 = P_T(v) gives inf, as KL should.

    Args:
        student_row_logprobs, teacher_row_logprobs: [..., V].
    Returns:
        [...] KL per position, >= 0 (float rounding clamped).
    """
    _check_same_shape("student_row_logprobs", student_row_logprobs, "teacher_row_logprobs", teacher_row_logprobs)
    if student_row_logprobs.ndim < 1 or student_row_logprobs.shape[-1] < 1:
        raise ValueError(f"rows must have a vocabulary dimension, got shape {tuple(student_row_logprobs.shape)}")
    _check_rows("student_row_logprobs", student_row_logprobs)
    _check_rows("teacher_row_logprobs", teacher_row_logprobs)
    dtype = _float_dtype(student_row_logprobs, teacher_row_logprobs)
    with torch.no_grad():
        log_s = torch.log_softmax(student_row_logprobs.detach().to(dtype), dim=-1)
        log_t = torch.log_softmax(teacher_row_logprobs.detach().to(dtype), dim=-1)
        p_s = log_s.exp()
        terms = torch.where(p_s > 0, p_s * (log_s - log_t), torch.zeros_like(p_s))
        return terms.sum(dim=-1).clamp_min(0.0)


def position_asymmetry_topk(
    student_topk_ids: Tensor,
    student_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
) -> Tensor:
    """D_bar_t = KL(P_S || P_T) estimated from each view's top-k tokens.

    Support: the union U of both top-k id sets (as the paper's Fig. 2 does with top-100).
    A token of U missing from view X's top-k has an unknown probability, bounded by X's k-th
    probability and by X's tail mass tau_X = 1 - sum(top-k probs). It gets

        q_X = min(kth_X, tau_X / (n_X + 1))      n_X = tokens of U missing from X's top-k

    (the tail shared evenly among those tokens and the rest of the vocabulary), then both
    views are renormalised over U and KL is taken over U. Exact when k = V, and when each
    view's top-k holds all of its mass; an approximation otherwise that improves as the
    top-k mass approaches 1 (within ~1% at > 99.5% coverage in tests/test_theory.py).
    Teacher probabilities of student-mass tokens are floored at 1e-8 so float rounding of
    tau_T cannot turn the estimate into inf. Memory: a [..., k, k] bool match matrix.

    Args:
        student_topk_ids, teacher_topk_ids: [..., k] long, distinct ids per position.
        student_topk_logprobs, teacher_topk_logprobs: [..., k] their log-probs (-inf allowed).
    Returns:
        [...] KL per position (float64 compute, returned as float32 unless inputs are float64), >= 0.
    """
    _check_same_shape("student_topk_ids", student_topk_ids, "student_topk_logprobs", student_topk_logprobs)
    _check_same_shape("teacher_topk_ids", teacher_topk_ids, "teacher_topk_logprobs", teacher_topk_logprobs)
    _check_same_shape("student_topk_ids", student_topk_ids, "teacher_topk_ids", teacher_topk_ids)
    if student_topk_ids.ndim < 1 or student_topk_ids.shape[-1] < 1:
        raise ValueError(f"top-k tensors need a k dimension >= 1, got shape {tuple(student_topk_ids.shape)}")
    _check_rows("student_topk_logprobs", student_topk_logprobs)
    _check_rows("teacher_topk_logprobs", teacher_topk_logprobs)
    out_dtype = _float_dtype(student_topk_logprobs, teacher_topk_logprobs)
    with torch.no_grad():
        # float64: the tail masses are differences 1 - sum(...) of near-equal numbers
        p_s = student_topk_logprobs.detach().to(torch.float64).exp()
        p_t = teacher_topk_logprobs.detach().to(torch.float64).exp()
        # match[..., i, j]: teacher's i-th id == student's j-th id
        match = teacher_topk_ids[..., :, None] == student_topk_ids[..., None, :]
        t_in_s = match.any(dim=-1)  # [..., k] teacher entry also in the student's top-k
        s_in_t = match.any(dim=-2)  # [..., k] student entry also in the teacher's top-k
        # Estimated probability of a union token missing from a view's top-k.
        tau_s = (1.0 - p_s.sum(-1, keepdim=True)).clamp_min(0.0)
        tau_t = (1.0 - p_t.sum(-1, keepdim=True)).clamp_min(0.0)
        n_s = (~t_in_s).sum(-1, keepdim=True)  # union tokens the student's top-k lacks
        n_t = (~s_in_t).sum(-1, keepdim=True)  # union tokens the teacher's top-k lacks
        q_s = torch.minimum(p_s.amin(-1, keepdim=True), tau_s / (n_s + 1))
        q_t = torch.minimum(p_t.amin(-1, keepdim=True), tau_t / (n_t + 1)).clamp_min(_TOPK_TEACHER_FLOOR)
        # Teacher probability at each student id: its matched value, else the estimate.
        matched = match.to(torch.uint8).argmax(dim=-2)  # teacher index of each student id
        t_at_s = torch.where(s_in_t, p_t.gather(-1, matched), q_t)
        # Union U = student ids, then teacher ids not already among them.
        s_u = torch.cat([p_s, torch.where(t_in_s, 0.0, q_s.expand_as(p_t))], dim=-1)
        t_u = torch.cat([t_at_s, torch.where(t_in_s, 0.0, p_t)], dim=-1)
        s_u = s_u / s_u.sum(-1, keepdim=True)
        t_u = t_u / t_u.sum(-1, keepdim=True)
        terms = torch.where(s_u > 0, s_u * (s_u.log() - t_u.log()), torch.zeros_like(s_u))
        return terms.sum(dim=-1).clamp_min(0.0).to(out_dtype)


def _correct_rows(adv: Tensor, rew: Tensor) -> Tensor:
    """[B] bool: correct rollouts with positive advantage (where up-weighting is meaningful)."""
    return correct_mask(rew) & (adv > 0)


def upweighted_fraction(
    method: str,
    advantages: Tensor,
    rewards: Tensor,
    student_logprobs: Tensor,
    teacher_logprobs: Tensor | None,
    mask: Tensor,
) -> float:
    """Fraction of tokens of correct rollouts (r = 1, A > 0) whose weight w_t exceeds 1.

    For RLRT this is the fraction with D_hat_t > 0 (self-driven tokens, sec. 5); for RLSD
    the fraction with D_hat_t < 0; for GRPO 0. With lam > 0 and eps_w > 0 the effective
    factor (1 - lam) + lam * clip(w_t) exceeds 1 exactly when w_t does. Rows outside the
    method's gate count as weight 1. Returns 0.0 when there is no such token.

    Args: as `token_advantages` (advantages/rewards [B], log-probs and mask [B, T]).
    """
    with torch.no_grad():
        adv, rew, student, teacher, mask = _validated_token_inputs(
            method, advantages, rewards, student_logprobs, teacher_logprobs, mask
        )
        weight, gate = get_method(method).weight(adv, rew, student, teacher)
        tokens = mask & _correct_rows(adv, rew)[:, None]
        n = int(tokens.sum())
        if n == 0:
            return 0.0
        up = (weight > 1.0) & gate[:, None] & tokens
        return float(up.sum()) / n


def asymmetry_summary(
    method: str,
    advantages: Tensor,
    rewards: Tensor,
    student_logprobs: Tensor,
    teacher_logprobs: Tensor | None,
    mask: Tensor,
    *,
    lam: float,
    eps_w: float,
) -> dict[str, float]:
    """Scalar diagnostics of the teacher signal for metrics (python floats).

    Keys:
        d_hat_mean, d_hat_p50, d_hat_p90, d_hat_max: D_hat_t over tokens of correct rollouts (r = 1).
        d_hat_mean_all: D_hat_t over all valid tokens.
        upweighted_frac: `upweighted_fraction(...)`.
        weight_mean: mean of clip(w_t, 1 - eps_w, 1 + eps_w) over tokens of gated rows with A != 0.
        weight_clip_frac: fraction of those tokens where the clip is active.
        token_adv_mean_abs_shift: mean |A_t - A| / |A| over those tokens (bounded by lam * eps_w).
        n_correct_tokens: number of tokens of correct rollouts.
    Statistics over an empty set are 0. Returns {} for "grpo" without a teacher.
    """
    _check_unit_interval("lam", lam)
    if not (math.isfinite(eps_w) and eps_w >= 0.0):
        raise ValueError(f"eps_w must be a finite number >= 0, got {eps_w!r}")
    if teacher_logprobs is None and not method_needs_teacher(method):
        _check_method(method)
        return {}
    with torch.no_grad():
        adv, rew, student, teacher, mask = _validated_token_inputs(
            method, advantages, rewards, student_logprobs, teacher_logprobs, mask
        )
        assert teacher is not None
        d_hat = student - teacher
        correct = mask & correct_mask(rew)[:, None]
        d_correct = d_hat[correct]
        out: dict[str, Any] = {"n_correct_tokens": float(d_correct.numel())}
        if d_correct.numel():
            q = torch.quantile(d_correct, torch.tensor([0.5, 0.9], dtype=d_correct.dtype))
            out.update(
                d_hat_mean=float(d_correct.mean()),
                d_hat_p50=float(q[0]),
                d_hat_p90=float(q[1]),
                d_hat_max=float(d_correct.max()),
            )
        else:
            out.update(d_hat_mean=0.0, d_hat_p50=0.0, d_hat_p90=0.0, d_hat_max=0.0)
        d_valid = d_hat[mask]
        out["d_hat_mean_all"] = float(d_valid.mean()) if d_valid.numel() else 0.0

        weight, gate = get_method(method).weight(adv, rew, student, teacher)
        shaped = mask & (gate & (adv != 0))[:, None]
        w = weight[shaped]
        if w.numel():
            clipped = w.clamp(1.0 - eps_w, 1.0 + eps_w)
            out["weight_mean"] = float(clipped.mean())
            out["weight_clip_frac"] = float((clipped != w).sum()) / w.numel()
            out["token_adv_mean_abs_shift"] = float((lam * (clipped - 1.0)).abs().mean())
        else:
            out.update(weight_mean=1.0, weight_clip_frac=0.0, token_adv_mean_abs_shift=0.0)
        out["upweighted_frac"] = upweighted_fraction(
            method, advantages, rewards, student_logprobs, teacher_logprobs, mask
        )
        return out
