"""SDPO's divergence (algorithms.self_distillation_divergence) and the registered losses."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlrt_core import algorithms
from rlrt_core.config import AlgorithmConfig
from rlrt_core.losses import LossBatch, get_loss, register_loss
from rlrt_core.methods import get_method

div = algorithms.self_distillation_divergence
PROPS = settings(max_examples=60, deadline=None)


def lp(*p: float) -> torch.Tensor:
    return torch.tensor([math.log(x) if x > 0 else -math.inf for x in p], dtype=torch.float64)


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# ---------------------------------------------------------------- hand-computed cases


def test_renormalised_two_token_cases():
    s, t = lp(0.5, 0.5), lp(0.9, 0.1)
    ps, pt = [0.5, 0.5], [0.9, 0.1]
    assert float(div(s, t, alpha=0.0, add_tail=False)) == pytest.approx(kl(pt, ps), abs=1e-12)   # 0.368064
    assert float(div(s, t, alpha=1.0, add_tail=False)) == pytest.approx(kl(ps, pt), abs=1e-12)   # 0.510826
    m = [0.7, 0.3]  # (1 - 0.5) P_S + 0.5 P_T
    js = 0.5 * kl(pt, m) + 0.5 * kl(ps, m)
    assert js == pytest.approx(0.1017496, abs=1e-6)
    assert float(div(s, t, alpha=0.5, add_tail=False)) == pytest.approx(js, abs=1e-12)
    # generalised JS, alpha = 0.25: M = 0.75 P_S + 0.25 P_T
    m = [0.75 * a + 0.25 * b for a, b in zip(ps, pt)]
    assert float(div(s, t, alpha=0.25, add_tail=False)) == pytest.approx(0.25 * kl(pt, m) + 0.75 * kl(ps, m), abs=1e-12)
    # without the tail, a partial support is renormalised: [0.2, 0.2] is the uniform pair
    assert float(div(lp(0.2, 0.2), t, alpha=0.0, add_tail=False)) == pytest.approx(kl(pt, ps), abs=1e-12)


def test_tail_bucket_holds_the_missing_mass():
    # k = 1: student 0.5 (tail 0.5), teacher 0.25 (tail 0.75)
    s, t = lp(0.5), lp(0.25)
    assert float(div(s, t, alpha=0.0)) == pytest.approx(kl([0.25, 0.75], [0.5, 0.5]), abs=1e-12)
    assert float(div(s, t, alpha=1.0)) == pytest.approx(kl([0.5, 0.5], [0.25, 0.75]), abs=1e-12)
    # k = 2 partial supports
    s, t = lp(0.6, 0.2), lp(0.3, 0.3)
    assert float(div(s, t, alpha=1.0)) == pytest.approx(kl([0.6, 0.2, 0.2], [0.3, 0.3, 0.4]), abs=1e-12)


def test_kl_clip_caps_each_position_and_shape_is_kept():
    s = torch.stack([lp(0.5, 0.5), lp(0.99, 0.01)])
    t = torch.stack([lp(0.5, 0.5), lp(0.01, 0.99)])
    out = div(s, t, alpha=1.0, add_tail=False, kl_clip=1.0)
    assert out.shape == (2,) and float(out[0]) == pytest.approx(0.0, abs=1e-12) and float(out[1]) == 1.0
    batched = div(torch.randn(3, 4, 5).log_softmax(-1), torch.randn(3, 4, 5).log_softmax(-1), alpha=0.5)
    assert batched.shape == (3, 4) and batched.dtype == torch.float32


def test_numerically_safe_at_the_edges():
    # support holding all the mass (tail ~ 0) and -inf log-probs: finite values and gradients
    s = torch.tensor([[0.0, -math.inf], [math.log(0.5), math.log(0.5)]], requires_grad=True)
    t = torch.tensor([[-math.inf, 0.0], [math.log(0.5), math.log(0.5)]])
    for alpha in (0.0, 0.5, 1.0):
        for tail in (True, False):
            out = div(s, t, alpha=alpha, add_tail=tail)
            assert torch.isfinite(out).all() and (out >= 0).all()
            assert float(out[1].detach()) == pytest.approx(0.0, abs=1e-5)
            (g,) = torch.autograd.grad(out.sum(), s)
            assert torch.isfinite(g).all()
    assert float(div(s, t, alpha=1.0, add_tail=False)[0].detach()) > 50  # disjoint supports: a large divergence
    with pytest.raises(ValueError, match="alpha"):
        div(s, t, alpha=1.5)
    with pytest.raises(ValueError, match="kl_clip"):
        div(s, t, alpha=0.5, kl_clip=0.0)
    with pytest.raises(ValueError, match="NaN"):
        div(torch.tensor([float("nan")]), torch.tensor([0.0]), alpha=0.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        div(torch.zeros(2, 3), torch.zeros(2, 4), alpha=0.5)


# ---------------------------------------------------------------- properties


@st.composite
def views(draw, k_max=6):
    k = draw(st.integers(1, k_max))
    n = draw(st.integers(1, 4))
    logits = hnp.arrays(np.float64, (n, k + 1), elements=st.floats(-8.0, 8.0))
    a = torch.from_numpy(draw(logits)).log_softmax(-1)[:, :k]  # the first k tokens of a k+1 vocabulary
    b = torch.from_numpy(draw(logits)).log_softmax(-1)[:, :k]
    alpha = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0)))
    return a, b, alpha, draw(st.booleans())


def _dists(s: torch.Tensor, t: torch.Tensor, tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if tail:
        ps, pt = s.exp(), t.exp()
        return (torch.cat([ps, (1 - ps.sum(-1, keepdim=True)).clamp_min(0)], -1),
                torch.cat([pt, (1 - pt.sum(-1, keepdim=True)).clamp_min(0)], -1))
    return s.softmax(-1), t.softmax(-1)


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


@PROPS
@given(views())
def test_non_negative_and_zero_when_views_agree(v):
    s, t, alpha, tail = v
    out = div(s, t, alpha=alpha, add_tail=tail)
    assert (out >= 0).all() and torch.isfinite(out).all()
    assert torch.allclose(div(s, s.clone(), alpha=alpha, add_tail=tail), torch.zeros(s.shape[0], dtype=s.dtype),
                          atol=1e-9)


@PROPS
@given(views())
def test_alpha_zero_and_one_are_the_two_kls(v):
    s, t, _, tail = v
    ps, pt = _dists(s, t, tail)
    torch.testing.assert_close(div(s, t, alpha=0.0, add_tail=tail), _kl_rows(pt, ps), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(div(s, t, alpha=1.0, add_tail=tail), _kl_rows(ps, pt), atol=1e-6, rtol=1e-6)


@PROPS
@given(views())
def test_generalised_js_matches_its_definition_and_gradient_is_finite(v):
    s, t, alpha, tail = v
    ps, pt = _dists(s, t, tail)
    if 0.0 < alpha < 1.0:
        m = (1 - alpha) * ps + alpha * pt
        ref = alpha * _kl_rows(pt, m) + (1 - alpha) * _kl_rows(ps, m)
        torch.testing.assert_close(div(s, t, alpha=alpha, add_tail=tail), ref, atol=1e-6, rtol=1e-6)
    s32 = s.float().requires_grad_(True)
    (g,) = torch.autograd.grad(div(s32, t.float(), alpha=alpha, add_tail=tail).sum(), s32)
    assert torch.isfinite(g).all()


# ---------------------------------------------------------------- losses


def _batch(rewards, has_teacher, *, T=3, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(rewards)
    logits = torch.randn(b, T, 10, generator=g)
    student_rows = logits.log_softmax(-1)
    support = student_rows.topk(k, dim=-1).indices
    teacher_rows = (logits + torch.randn(b, T, 10, generator=g)).log_softmax(-1)
    ids = torch.randint(0, 10, (b, T), generator=g)
    logprobs = student_rows.gather(-1, ids[..., None]).squeeze(-1)
    mask = torch.ones(b, T, dtype=torch.bool)
    mask[-1, -1] = False
    adv = torch.tensor(rewards) - torch.tensor(rewards).mean()
    batch = LossBatch(mask=mask, rewards=torch.tensor(rewards), behavior_logprobs=logprobs - 0.1,
                      token_advantages=adv[:, None].expand(b, T).clone(), old_logprobs=logprobs.clone(),
                      support_ids=support, teacher_support_logprobs=teacher_rows.gather(-1, support),
                      teacher_entropy=-(teacher_rows.exp() * teacher_rows).sum(-1),
                      has_teacher=torch.tensor(has_teacher))
    batch.logprobs = logprobs.clone().requires_grad_(True)
    batch.support_logprobs = student_rows.gather(-1, support).clone().requires_grad_(True)
    return batch


def test_ppo_loss_is_policy_loss():
    batch = _batch([1.0, 0.0, 1.0], [True, True, True])
    cfg = AlgorithmConfig(method="grpo")
    loss, met = get_loss("ppo").fn(get_loss("ppo").prepared(batch, cfg), cfg)
    ref, ref_met = algorithms.policy_loss(batch.logprobs, batch.old_logprobs, batch.token_advantages, batch.mask,
                                          behavior_logprobs=batch.behavior_logprobs, is_cap=2.0)
    assert torch.equal(loss, ref) and met == ref_met


def test_sdpo_loss_by_hand_and_rows_without_teacher_get_no_gradient():
    cfg = AlgorithmConfig(method="sdpo", distill_is_clip=2.0)
    spec = get_loss("sdpo")
    batch = spec.prepared(_batch([1.0, 0.0, 0.0], [True, True, False]), cfg)
    assert batch.loss_mask[:2].all() and not batch.loss_mask[2].any()
    loss, met = spec.fn(batch, cfg)
    d = div(batch.support_logprobs.detach(), batch.teacher_support_logprobs, alpha=0.5)
    ratio = (batch.logprobs.detach() - batch.behavior_logprobs).exp().clamp(max=2.0)  # = e^0.1
    tokens = batch.mask & batch.has_teacher[:, None]
    expected = (d * ratio)[tokens].sum() / tokens.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert met["distill"] == pytest.approx(float(expected), rel=1e-6) and met["distill_is_ratio_mean"] == pytest.approx(
        math.exp(0.1), rel=1e-5)
    loss.backward()
    g = batch.support_logprobs.grad
    assert torch.isfinite(g).all() and g[2].abs().sum() == 0 and g[:2].abs().sum() > 0
    assert batch.logprobs.grad is None or batch.logprobs.grad.abs().sum() == 0  # the IS ratio is detached


def test_srpo_routes_and_weights_by_teacher_entropy():
    cfg = AlgorithmConfig(method="srpo", srpo_beta=1.0)
    spec = get_loss("srpo")
    rewards, has = [1.0, 0.0, 0.0, 0.0], [False, True, True, False]  # row 3: failed, no teacher -> GRPO
    batch = spec.prepared(_batch(rewards, has, seed=3), cfg)
    sdpo_tokens = batch.mask & torch.tensor([False, True, True, False])[:, None]
    w = batch.token_weight
    assert float(w[sdpo_tokens].mean()) == pytest.approx(1.0, abs=1e-6)  # normalised over Omega_sdpo
    raw = torch.exp(-batch.teacher_entropy)
    torch.testing.assert_close(w[sdpo_tokens], raw[sdpo_tokens] / raw[sdpo_tokens].mean())
    assert (w[~sdpo_tokens] == 1).all()
    loss, met = spec.fn(batch, cfg)
    n = batch.mask.sum()
    grpo_mask = batch.mask & ~sdpo_tokens
    pg, _ = algorithms.policy_loss(batch.logprobs, batch.old_logprobs, batch.token_advantages, grpo_mask,
                                   behavior_logprobs=batch.behavior_logprobs, is_cap=2.0, num_tokens=float(n))
    d = div(batch.support_logprobs.detach(), batch.teacher_support_logprobs, alpha=0.5)
    ratio = (batch.logprobs.detach() - batch.behavior_logprobs).exp().clamp(max=2.0)
    distill = (d * ratio * w)[sdpo_tokens].sum() / n
    assert float(loss) == pytest.approx(float(pg + distill), rel=1e-6)
    assert met["sdpo_token_frac"] == pytest.approx(float(sdpo_tokens.sum() / n))
    loss.backward()
    assert batch.support_logprobs.grad[[0, 3]].abs().sum() == 0 and batch.support_logprobs.grad[[1, 2]].abs().sum() > 0
    assert batch.logprobs.grad[1:3].abs().sum() == 0 and batch.logprobs.grad[[0, 3]].abs().sum() > 0
    # beta = 0: no reweighting
    flat = spec.prepared(_batch(rewards, has, seed=3), AlgorithmConfig(method="srpo", srpo_beta=0.0))
    assert (flat.token_weight == 1).all()


def test_loss_registry_refuses_duplicates_and_lists_names():
    with pytest.raises(ValueError, match="already registered"):
        register_loss("ppo")(lambda b, c: None)
    with pytest.raises(ValueError, match=r"unknown loss 'x'; registered losses: .*ppo.*sdpo.*srpo"):
        get_loss("x")
    assert get_loss(get_method("sdpo").loss).needs_old_logprobs is False
    assert get_loss("srpo").needs_old_logprobs and get_loss("srpo").needs_support
