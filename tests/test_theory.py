"""Numeric checks of the paper's theory (sec. 4.2, 4.3, appendix C) against the library code.

Bayesian teacher (eq. 4): P_T(v) = P_S(v) f(v) / f_bar, f(v) = Pr[R = 1 | h_t, y_t = v],
f_bar = E_{v ~ P_S} f(v). Lemma 1: D_hat(v) = log f_bar - log f(v).
Theorem 2: Inf_S(t)^2 <= 2 D_bar_t, Inf_S(t) = E_{v ~ P_S} |f(v) - f_bar|, D_bar_t = KL(P_S || P_T).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlrt_core.algorithms import (
    ADVANTAGE_METHODS,
    position_asymmetry,
    position_asymmetry_topk,
    token_advantages,
    token_asymmetry,
)

PROPS = settings(max_examples=100, deadline=None)


def bayes_teacher(p_s: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, V] student probabilities and per-token success probabilities -> (P_T [N, V], f_bar [N, 1])."""
    f_bar = (p_s * f).sum(-1, keepdim=True)
    return p_s * f / f_bar, f_bar


@st.composite
def positions(draw):
    """A batch of N positions over a vocabulary of V tokens: P_S and f, float64."""
    seed = draw(st.integers(0, 2**31 - 1))
    n = draw(st.integers(1, 16))
    v = draw(st.integers(2, 64))
    temperature = draw(st.sampled_from([0.1, 0.5, 1.0, 3.0, 10.0]))
    f_low = draw(st.sampled_from([1e-4, 0.01, 0.3, 0.9, 0.999]))
    g = torch.Generator().manual_seed(seed)
    p_s = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * temperature, -1)
    f = f_low + (1.0 - f_low) * torch.rand(n, v, generator=g, dtype=torch.float64)
    return p_s, f


@PROPS
@given(positions())
def test_lemma1_bayesian_teacher(pos):
    p_s, f = pos
    p_t, f_bar = bayes_teacher(p_s, f)
    torch.testing.assert_close(p_t.sum(-1), torch.ones(p_s.shape[0], dtype=p_s.dtype))
    # every vocabulary entry treated as a sampled token: D_hat(v) = log f_bar - log f(v)
    d_hat = token_asymmetry(p_s.log(), p_t.log())
    torch.testing.assert_close(d_hat, f_bar.log() - f.log(), atol=1e-10, rtol=1e-10)
    # converse: a teacher defined through D_hat = log f_bar - log f is the Bayes teacher
    torch.testing.assert_close(p_s * torch.exp(-(f_bar.log() - f.log())), p_t)
    # sec. 4.3: D_hat(v) > 0 (explore) exactly for tokens that lower the success probability
    sure = (f - f_bar).abs() > 1e-9
    assert torch.equal((d_hat > 0)[sure], (f < f_bar)[sure])


def test_lemma1_by_sampling():
    """Bayes' rule by simulation: tokens of successful rollouts are distributed as P_S f / f_bar."""
    g = torch.Generator().manual_seed(7)
    p_s = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    f = torch.tensor([0.2, 0.9, 0.5, 1.0], dtype=torch.float64)
    n = 400_000
    tokens = torch.multinomial(p_s, n, replacement=True, generator=g)
    success = torch.rand(n, generator=g, dtype=torch.float64) < f[tokens]
    empirical = torch.bincount(tokens[success], minlength=4).double() / success.sum()
    p_t, f_bar = bayes_teacher(p_s[None], f[None])
    # f_bar = 0.1 + 0.27 + 0.075 + 0.05 = 0.495; P_T = [0.2020, 0.5455, 0.1515, 0.1010]
    assert f_bar.item() == pytest.approx(0.495)
    torch.testing.assert_close(empirical, p_t[0], atol=4e-3, rtol=0)


@PROPS
@given(positions())
def test_theorem2_influence_bounded_by_asymmetry(pos):
    p_s, f = pos
    p_t, f_bar = bayes_teacher(p_s, f)
    influence = (p_s * (f - f_bar).abs()).sum(-1)  # eq. 5
    d_bar = position_asymmetry(p_s.log(), p_t.log())  # eq. 3
    tv = 0.5 * (p_s - p_t).abs().sum(-1)
    # Step 1 (appendix C.2): Inf = 2 f_bar TV <= 2 TV
    torch.testing.assert_close(influence, 2 * f_bar[:, 0] * tv, atol=1e-12, rtol=1e-9)
    # Step 2: Pinsker, then the theorem
    assert (tv <= torch.sqrt(0.5 * d_bar) + 1e-12).all()
    assert (influence**2 <= 2 * d_bar + 1e-12).all()


def test_theorem2_is_tight_and_inert_positions_have_no_asymmetry():
    """The factor 2 is sharp (f_bar -> 1, small two-point perturbation), so a KL computed
    with a wrong scale or direction would break the bound here."""
    p_s = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    for delta in (1e-2, 1e-3):
        f = torch.tensor([[1.0, 1.0 - 2 * delta]], dtype=torch.float64)
        p_t, f_bar = bayes_teacher(p_s, f)
        influence = (p_s * (f - f_bar).abs()).sum(-1)
        d_bar = position_asymmetry(p_s.log(), p_t.log())
        ratio = (influence**2 / (2 * d_bar)).item()
        assert 0.95 < ratio <= 1.0
        # at this tightness a KL off by a factor of 2 would break the theorem
        assert (influence**2 > d_bar).all()
    # f constant: the teacher equals the student, D_bar = 0 and the position is inert
    f = torch.full((1, 2), 0.4, dtype=torch.float64)
    p_t, _ = bayes_teacher(p_s, f)
    assert position_asymmetry(p_s.log(), p_t.log()).item() == pytest.approx(0.0, abs=1e-15)


@PROPS
@given(positions())
def test_weights_under_bayesian_teacher(pos):
    """How the method weights relate to D_bar on a correct rollout (A > 0):
    E_S[w_RLSD] = 1 (the teacher only redistributes credit), E_T[w_RLRT] = 1,
    E_S[log w_RLRT] = D_bar, and E_S[w_RLRT] >= 1 (Jensen)."""
    p_s, f = pos
    p_t, _ = bayes_teacher(p_s, f)
    n, v = p_s.shape
    adv = torch.ones(n, dtype=torch.float64)
    rew = torch.ones(n, dtype=torch.float64)
    w_rlrt, gate = ADVANTAGE_METHODS["rlrt"](adv, rew, p_s.log(), p_t.log())
    w_rlsd, _ = ADVANTAGE_METHODS["rlsd"](adv, rew, p_s.log(), p_t.log())
    assert gate.all()
    one = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close((p_s * w_rlsd).sum(-1), one)
    torch.testing.assert_close((p_t * w_rlrt).sum(-1), one)
    torch.testing.assert_close((p_s * w_rlrt.log()).sum(-1), position_asymmetry(p_s.log(), p_t.log()))
    assert ((p_s * w_rlrt).sum(-1) >= 1 - 1e-12).all()
    # RLRT raises the advantage of exactly the tokens that lower f (sec. 4.3, eq. 6)
    out = token_advantages("rlrt", adv, rew, p_s.log(), p_t.log(), torch.ones(n, v, dtype=torch.bool),
                           lam=1.0, eps_w=10.0)
    _, f_bar = bayes_teacher(p_s, f)
    sure = (f - f_bar).abs() > 1e-9
    assert torch.equal((out > 1)[sure], (f < f_bar)[sure])


def test_topk_asymmetry_approximates_full_kl_when_mass_is_covered():
    g = torch.Generator().manual_seed(3)
    v, k = 200, 40
    # peaked rows: the top-40 tokens carry nearly all of the mass
    s = torch.log_softmax(torch.randn(32, v, generator=g, dtype=torch.float64) * 6.0, -1)
    t = torch.log_softmax(s + 0.5 * torch.randn(32, v, generator=g, dtype=torch.float64), -1)
    sv, si = s.topk(k, -1)
    tv, ti = t.topk(k, -1)
    assert (sv.exp().sum(-1) > 0.995).all()
    full = position_asymmetry(s, t)
    approx = position_asymmetry_topk(si, sv, ti, tv)
    assert (approx >= 0).all()
    torch.testing.assert_close(approx, full, atol=1e-3, rtol=1e-2)
    assert math.isfinite(float(approx.sum()))
