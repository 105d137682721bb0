"""RLRT algorithm core: hand-computed cases, properties (hypothesis), and input errors."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlrt_core.algorithms import (
    ADVANTAGE_METHODS,
    ADVANTAGE_REGISTRY,
    METHODS,
    asymmetry_summary,
    group_advantages,
    method_needs_teacher,
    mixing_schedule,
    policy_loss,
    position_asymmetry,
    position_asymmetry_topk,
    register_method,
    token_advantages,
    token_asymmetry,
    upweighted_fraction,
)

PROPS = settings(max_examples=100, deadline=None)
E = math.e


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------- group advantages


def test_group_advantages_by_hand():
    rewards = t([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    # Dr.GRPO: r - mean
    expected = t([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.25, -0.25, -0.25, 0.75]])
    assert torch.equal(group_advantages(rewards, norm_by_std=False), expected)
    # Bessel std: group 0: sum sq dev = 1, var = 1/3, std = 0.577350 -> +-0.5/0.577350 = +-0.866025
    #             group 2: sum sq dev = 0.75, var = 0.25, std = 0.5 -> [-0.5, -0.5, -0.5, 1.5]
    got = group_advantages(rewards, norm_by_std=True, eps=0.0)
    expected = t([[0.866025, -0.866025, -0.866025, 0.866025], [0, 0, 0, 0], [-0.5, -0.5, -0.5, 1.5]])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # eps shrinks the magnitude a little: 0.5 / (0.5 + 0.1) = 0.8333...
    got = group_advantages(t([[0, 0, 0, 1]]), norm_by_std=True, eps=0.1)
    torch.testing.assert_close(got, t([[-0.25 / 0.6, -0.25 / 0.6, -0.25 / 0.6, 0.75 / 0.6]]))


@pytest.mark.parametrize("norm", [True, False])
def test_group_advantages_degenerate_groups_are_exact_zero(norm):
    # identical values whose float mean does not round back exactly, eps = 0, and K = 1
    x = t(0.4900934100151062)  # float32 mean of [x, x, x] is not exactly x
    assert t([x, x, x]).mean() != x
    out = group_advantages(t([[x, x, x]]), norm_by_std=norm, eps=0.0)
    assert torch.equal(out, torch.zeros_like(out))
    single = group_advantages(t([[1.0], [0.0]]), norm_by_std=norm)
    assert torch.equal(single, torch.zeros(2, 1))
    ints = group_advantages(torch.tensor([[1, 0]]), norm_by_std=norm)
    assert ints.dtype == torch.float32 and torch.isfinite(ints).all()


@PROPS
@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 8)), elements=st.floats(-10, 10)),
    st.booleans(),
)
def test_group_advantages_zero_mean_per_group(rewards, norm):
    r = torch.from_numpy(rewards)
    adv = group_advantages(r, norm_by_std=norm)
    assert adv.shape == r.shape and torch.isfinite(adv).all()
    torch.testing.assert_close(adv.mean(dim=-1), torch.zeros(r.shape[0], dtype=r.dtype), atol=1e-9, rtol=0)
    if norm and r.shape[1] > 1:
        std = r.std(dim=-1)
        spread = std > 1e-3  # away from the eps regime the standardised group has unit std
        torch.testing.assert_close(adv.std(dim=-1)[spread], torch.ones_like(std[spread]), atol=1e-3, rtol=0)


# ---------------------------------------------------------------- token advantages, by hand

# Row 0: r = 1, A = +1, D_hat = s - t = [0.5, -1.0, 0.0]
# Row 1: r = 0, A = -1, D_hat = [0.5, -2.0, (masked)]
# Row 2: r = 1, A = 0 (all-correct group) -> all zero
ADV = t([1.0, -1.0, 0.0])
REW = t([1.0, 0.0, 1.0])
S = t([[-1.0, -2.0, -0.5], [-0.2, -3.0, -1.0], [-1.0, -1.0, -1.0]])
T = t([[-1.5, -1.0, -0.5], [-0.7, -1.0, -9.0], [-2.0, -2.0, -2.0]])
MASK = t([[1, 1, 1], [1, 1, 0], [1, 1, 1]], torch.bool)

# lam = 0.5, eps_w = 0.2 -> clip to [0.8, 1.2]; factor = 0.5 + 0.5 * clip(w)
HAND = {
    "grpo": [[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0], [0.0, 0.0, 0.0]],
    # row0 w = exp(-D_hat) = [e^-0.5=0.607, e^1=2.718, 1] -> clip [0.8, 1.2, 1] -> [0.9, 1.1, 1.0]
    # row1 sign(A) = -1: w = exp(-(t - s)) = exp(D_hat) = [e^0.5, e^-2, .] -> [1.2, 0.8] -> -[1.1, 0.9]
    "rlsd": [[0.9, 1.1, 1.0], [-1.1, -0.9, 0.0], [0.0, 0.0, 0.0]],
    # row0 w = exp(D_hat) = [e^0.5=1.649, e^-1=0.368, 1] -> clip [1.2, 0.8, 1] -> [1.1, 0.9, 1.0]
    # row1 r = 0: untouched
    "rlrt": [[1.1, 0.9, 1.0], [-1.0, -1.0, 0.0], [0.0, 0.0, 0.0]],
    # row1 w = exp(-D_hat) = [e^-0.5, e^2, .] -> [0.8, 1.2] -> -[0.9, 1.1]
    "rlrt_all": [[1.1, 0.9, 1.0], [-0.9, -1.1, 0.0], [0.0, 0.0, 0.0]],
}


@pytest.mark.parametrize("method", sorted(HAND))
def test_token_advantages_by_hand(method):
    out = token_advantages(method, ADV, REW, S, T, MASK, lam=0.5, eps_w=0.2)
    torch.testing.assert_close(out, t(HAND[method]), atol=1e-6, rtol=0)


def test_token_advantages_unclipped_by_hand():
    # lam = 1, eps_w = 1 -> clip range [0, 2] leaves e^0.5 = 1.6487213 and e^-1 = 0.3678794 as they are
    out = token_advantages("rlrt", ADV, REW, S, T, MASK, lam=1.0, eps_w=1.0)
    torch.testing.assert_close(out[0], t([1.6487213, 0.3678794, 1.0]), atol=1e-6, rtol=0)
    # lam = 0.25: factor = 0.75 + 0.25 * w -> [1.1621803, 0.8419699, 1.0], times A = 2
    out = token_advantages("rlrt", t([2.0]), t([1.0]), S[:1], T[:1], MASK[:1], lam=0.25, eps_w=1.0)
    torch.testing.assert_close(out[0], t([2.3243606, 1.6839397, 2.0]), atol=1e-6, rtol=0)


def test_grpo_runs_without_teacher_and_others_refuse():
    out = token_advantages("grpo", ADV, REW, S, None, MASK, lam=0.5, eps_w=0.2)
    torch.testing.assert_close(out, t(HAND["grpo"]))
    assert method_needs_teacher("grpo") is False
    for method in ("rlsd", "rlrt", "rlrt_all"):
        assert method_needs_teacher(method) is True
        with pytest.raises(ValueError, match="needs teacher_logprobs"):
            token_advantages(method, ADV, REW, S, None, MASK, lam=0.5, eps_w=0.2)


def test_token_advantages_detached_and_garbage_padding_ignored():
    s = S.clone().requires_grad_(True)
    t_pad = T.clone()
    t_pad[1, 2] = float("nan")  # padding may hold anything
    s_pad = s.detach().clone()
    s_pad[1, 2] = -float("inf")
    out = token_advantages("rlrt_all", ADV, REW, s, T, MASK, lam=0.5, eps_w=0.2)
    assert not out.requires_grad
    out2 = token_advantages("rlrt_all", ADV, REW, s_pad, t_pad, MASK, lam=0.5, eps_w=0.2)
    torch.testing.assert_close(out2, t(HAND["rlrt_all"]), atol=1e-6, rtol=0)


def test_huge_asymmetry_does_not_overflow():
    # D_hat = 200 nats: exp overflows to inf, the clip brings it back to 1 + eps_w
    out = token_advantages("rlrt", t([1.0]), t([1.0]), t([[0.0]]), t([[-200.0]]), t([[True]]), lam=0.5, eps_w=1.0)
    torch.testing.assert_close(out, t([[1.5]]))


def test_registry_extension_is_one_function():
    name = "test_double_everywhere"

    @register_method(name, needs_teacher=False)
    def _double(advantages, rewards, student, teacher):
        return torch.full_like(student, 2.0), torch.ones_like(rewards, dtype=torch.bool)

    try:
        assert ADVANTAGE_REGISTRY is ADVANTAGE_METHODS and name in ADVANTAGE_METHODS
        out = token_advantages(name, ADV, REW, S, None, MASK, lam=1.0, eps_w=5.0)
        torch.testing.assert_close(out, 2.0 * t(HAND["grpo"]))
        with pytest.raises(ValueError, match="already registered"):
            register_method(name)(_double)
    finally:
        ADVANTAGE_METHODS.pop(name)
    assert METHODS == ("grpo", "rlsd", "rlrt", "rlrt_all")


# ---------------------------------------------------------------- token advantages, properties


@st.composite
def batches(draw, max_b=5, max_t=7):
    b = draw(st.integers(1, max_b))
    n = draw(st.integers(1, max_t))
    lp = st.floats(-8.0, 0.0)
    student = draw(hnp.arrays(np.float64, (b, n), elements=lp))
    teacher = draw(hnp.arrays(np.float64, (b, n), elements=lp))
    mask = draw(hnp.arrays(np.bool_, (b, n)))
    rewards = draw(hnp.arrays(np.float64, (b,), elements=st.sampled_from([0.0, 1.0])))
    adv = draw(hnp.arrays(np.float64, (b,), elements=st.one_of(st.just(0.0), st.floats(-3.0, 3.0))))
    lam = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
    eps_w = draw(st.one_of(st.sampled_from([0.0, 0.2, 0.5, 1.0]), st.floats(0.0, 3.0)))
    return (
        torch.from_numpy(adv),
        torch.from_numpy(rewards),
        torch.from_numpy(student),
        torch.from_numpy(teacher),
        torch.from_numpy(mask),
        lam,
        eps_w,
    )


@PROPS
@given(batches(), st.sampled_from(METHODS))
def test_lam_zero_is_grpo(batch, method):
    adv, rew, s, tt, mask, _, eps_w = batch
    grpo = token_advantages("grpo", adv, rew, s, None, mask, lam=0.0, eps_w=eps_w)
    out = token_advantages(method, adv, rew, s, tt, mask, lam=0.0, eps_w=eps_w)
    assert torch.equal(out, grpo)
    assert torch.equal(grpo, torch.where(mask, adv[:, None].expand_as(s), torch.zeros_like(s)))


@PROPS
@given(batches())
def test_rlrt_weight_is_reciprocal_of_rlsd(batch):
    adv, rew, s, tt, _, _, _ = batch
    w_rlrt, gate_rlrt = ADVANTAGE_METHODS["rlrt"](adv, rew, s, tt)
    w_rlsd, gate_rlsd = ADVANTAGE_METHODS["rlsd"](adv, rew, s, tt)
    w_all, gate_all = ADVANTAGE_METHODS["rlrt_all"](adv, rew, s, tt)
    torch.testing.assert_close(w_rlrt * w_rlsd, torch.ones_like(s), atol=1e-12, rtol=1e-12)
    assert torch.equal(w_all, w_rlrt)
    assert torch.equal(gate_rlrt, rew == 1.0) and gate_rlsd.all() and gate_all.all()
    # sign(A) = +1: RLRT weight > 1 exactly where the student is more confident (D_hat > 0)
    sure = (adv > 0)[:, None] & ((s - tt).abs() > 1e-12)  # exp() rounds tinier D_hat to 1
    assert torch.equal((w_rlrt > 1)[sure], (s - tt > 0)[sure])


@PROPS
@given(batches(), st.sampled_from(METHODS))
def test_perturbation_bounded_by_lam_eps_w(batch, method):
    adv, rew, s, tt, mask, lam, eps_w = batch
    out = token_advantages(method, adv, rew, s, tt, mask, lam=lam, eps_w=eps_w)
    a = adv[:, None].expand_as(s)
    bound = lam * eps_w * a.abs() + 1e-12
    assert ((out - a).abs()[mask] <= bound[mask]).all()
    # w_t > 0, so the factor is > 0: the direction of the update is never flipped
    assert (torch.sign(out)[mask] == torch.sign(a)[mask]).all()


@PROPS
@given(batches())
def test_rlrt_leaves_incorrect_rollouts_untouched(batch):
    adv, rew, s, tt, mask, lam, eps_w = batch
    out = token_advantages("rlrt", adv, rew, s, tt, mask, lam=lam, eps_w=eps_w)
    wrong = (rew == 0)[:, None] & mask
    assert torch.equal(out[wrong], adv[:, None].expand_as(s)[wrong])


@PROPS
@given(batches(), st.sampled_from(METHODS))
def test_masked_positions_are_zero(batch, method):
    adv, rew, s, tt, mask, lam, eps_w = batch
    out = token_advantages(method, adv, rew, s, tt, mask, lam=lam, eps_w=eps_w)
    assert out.shape == s.shape
    assert (out[~mask] == 0).all()
    zero_adv = (adv == 0)[:, None].expand_as(s)
    assert (out[zero_adv] == 0).all()  # sign(0) = 0: A = 0 rows stay 0


# ---------------------------------------------------------------- mixing schedule


def test_mixing_schedule():
    assert mixing_schedule(0, lam_init=0.5, decay_steps=30) == 0.5
    assert mixing_schedule(15, lam_init=0.5, decay_steps=30) == 0.25
    assert mixing_schedule(29, lam_init=0.6, decay_steps=30) == pytest.approx(0.02)
    assert mixing_schedule(30, lam_init=0.5, decay_steps=30) == 0.0
    assert mixing_schedule(45, lam_init=0.5, decay_steps=30) == 0.0
    assert mixing_schedule(10_000, lam_init=0.5, decay_steps=None) == 0.5
    with pytest.raises(ValueError, match="step"):
        mixing_schedule(-1, lam_init=0.5, decay_steps=30)
    with pytest.raises(ValueError, match="decay_steps"):
        mixing_schedule(0, lam_init=0.5, decay_steps=0)
    with pytest.raises(ValueError, match="lam_init"):
        mixing_schedule(0, lam_init=1.5, decay_steps=None)


# ---------------------------------------------------------------- policy loss, by hand


def _ratios(values):
    return torch.log(t([values]))


def test_policy_loss_by_hand():
    # A = [1, 1, -1, -1], old = 0, ratio = [1.5, 1.1, 0.5, 0.9]
    # tok0 A>0 ratio 1.5 > 1.28: clipped, L = -1.28 ; tok1 L = -1.1
    # tok2 A<0 ratio 0.5 < 0.8: clipped, L = -min(-0.5, -0.8) = 0.8 ; tok3 L = 0.9
    # loss = (-1.28 - 1.1 + 0.8 + 0.9) / 4 = -0.17
    logprobs = _ratios([1.5, 1.1, 0.5, 0.9]).requires_grad_(True)
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, m = policy_loss(logprobs, torch.zeros(1, 4), adv, mask)
    assert loss.item() == pytest.approx(-0.17, abs=1e-6)
    loss.backward()
    # d L_t / d logprob_t = -A ratio / n where unclipped, 0 where clipped
    torch.testing.assert_close(logprobs.grad, t([[0.0, -1.1 / 4, 0.0, 0.9 / 4]]))
    assert m["clip_frac_high"] == 0.25 and m["clip_frac_low"] == 0.25 and m["clip_frac"] == 0.5
    assert m["ratio_mean"] == pytest.approx((1.5 + 1.1 + 0.5 + 0.9) / 4)
    assert m["n_tokens"] == 4.0 and m["loss"] == pytest.approx(-0.17, abs=1e-6)
    # k3 = (ratio - 1) - log ratio
    k3 = [(r - 1) - math.log(r) for r in (1.5, 1.1, 0.5, 0.9)]
    assert m["approx_kl"] == pytest.approx(sum(k3) / 4, rel=1e-5)
    assert m["is_weight_mean"] == 1.0 and m["is_truncated_frac"] == 0.0


def test_policy_loss_dual_clip_and_is_weight_by_hand():
    # A = -1, ratio 5: plain PPO L = 5; dual-clip c = 3 caps it at 3
    logprobs = _ratios([5.0]).requires_grad_(True)
    adv = t([[-1.0]])
    mask = t([[True]], torch.bool)
    loss, m = policy_loss(logprobs, torch.zeros(1, 1), adv, mask)
    assert loss.item() == pytest.approx(5.0)
    loss, m = policy_loss(logprobs, torch.zeros(1, 1), adv, mask, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0) and m["dual_clip_frac"] == 1.0 and m["clip_frac"] == 1.0
    loss.backward()
    assert logprobs.grad.item() == 0.0

    # IS weights exp(old - behaviour) = [3, 0.5] truncated at 2 -> [2, 0.5]
    # ratio 1 everywhere, A = [1, 1]: L = [-1 * 2, -1 * 0.5], loss = -1.25
    logprobs = torch.zeros(1, 2, requires_grad=True)
    behaviour = t([[-math.log(3.0), math.log(2.0)]])
    loss, m = policy_loss(logprobs, torch.zeros(1, 2), t([[1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool),
                          behavior_logprobs=behaviour)
    assert loss.item() == pytest.approx(-1.25)
    assert m["is_weight_max"] == pytest.approx(2.0) and m["is_weight_mean"] == pytest.approx(1.25)
    assert m["is_truncated_frac"] == 0.5
    loss.backward()
    torch.testing.assert_close(logprobs.grad, t([[-1.0, -0.25]]))
    loss, m = policy_loss(logprobs, torch.zeros(1, 2), t([[1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool),
                          behavior_logprobs=behaviour, is_cap=None)
    assert loss.item() == pytest.approx(-1.75) and m["is_weight_max"] == pytest.approx(3.0)


def test_policy_loss_entropy_bonus_and_masking():
    logprobs = torch.zeros(2, 3, requires_grad=True)
    entropy = t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]]).requires_grad_(True)
    mask = t([[1, 1, 1], [1, 0, 0]], torch.bool)
    adv = t([[1.0, 1.0, 1.0], [1.0, 7.0, 7.0]])
    # pg = -1 per valid token -> -1; entropy mean over valid = (1+2+3+4)/4 = 2.5; loss = -1 - 0.1 * 2.5
    loss, m = policy_loss(logprobs, torch.zeros(2, 3), adv, mask, entropy=entropy, entropy_coef=0.1)
    assert loss.item() == pytest.approx(-1.25) and m["entropy"] == pytest.approx(2.5)
    loss.backward()
    torch.testing.assert_close(entropy.grad, torch.where(mask, torch.full((2, 3), -0.1 / 4), torch.zeros(2, 3)))
    assert (logprobs.grad[~mask] == 0).all()
    # num_tokens overrides the denominator (micro-batch accumulation)
    loss, _ = policy_loss(logprobs, torch.zeros(2, 3), adv, mask, num_tokens=8)
    assert loss.item() == pytest.approx(-4 / 8)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logprobs, torch.zeros(2, 3), adv, mask, entropy_coef=0.1)


def test_policy_loss_all_masked_is_zero_with_grad_path():
    logprobs = t([[-1.0, float("nan")]]).requires_grad_(True)  # garbage at padding
    mask = torch.zeros(1, 2, dtype=torch.bool)
    loss, m = policy_loss(logprobs, t([[-2.0, 5.0]]), t([[3.0, float("inf")]]), mask,
                          behavior_logprobs=t([[float("nan"), 0.0]]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(1, 2))
    assert m["n_tokens"] == 0.0 and m["clip_frac"] == 0.0 and math.isfinite(m["approx_kl"])


# ---------------------------------------------------------------- policy loss, properties


@st.composite
def loss_batches(draw):
    b = draw(st.integers(1, 4))
    n = draw(st.integers(1, 6))
    lr = st.floats(-0.7, 0.7)
    log_ratio = draw(hnp.arrays(np.float64, (b, n), elements=lr))
    old = draw(hnp.arrays(np.float64, (b, n), elements=st.floats(-6.0, 0.0)))
    behaviour_shift = draw(hnp.arrays(np.float64, (b, n), elements=st.floats(-2.0, 2.0)))
    adv = draw(hnp.arrays(np.float64, (b, n), elements=st.floats(-3.0, 3.0)))
    mask = draw(hnp.arrays(np.bool_, (b, n)))
    is_cap = draw(st.sampled_from([None, 1.0, 2.0, 5.0]))
    dual = draw(st.sampled_from([None, 1.5, 3.0]))
    old_t = torch.from_numpy(old)
    return (
        torch.from_numpy(log_ratio) + old_t,
        old_t,
        old_t + torch.from_numpy(behaviour_shift),
        torch.from_numpy(adv),
        torch.from_numpy(mask),
        is_cap,
        dual,
    )


@PROPS
@given(loss_batches())
def test_gradient_zero_exactly_where_clip_active(batch):
    new, old, behaviour, adv, mask, is_cap, dual = batch
    logprobs = new.clone().requires_grad_(True)
    loss, m = policy_loss(logprobs, old, adv, mask, behavior_logprobs=behaviour, is_cap=is_cap, dual_clip=dual)
    loss.backward()
    grad = logprobs.grad
    ratio = torch.exp(new - old)
    clipped = ((adv > 0) & (ratio > 1.28)) | ((adv < 0) & (ratio < 0.8))
    if dual is not None:
        clipped |= (adv < 0) & (ratio > dual)
    assert (grad[clipped | ~mask] == 0).all()
    # elsewhere the gradient is the IS-weighted policy gradient -A * ratio * w / n
    w = torch.exp(old - behaviour)
    if is_cap is not None:
        w = w.clamp(max=is_cap)
    n = max(int(mask.sum()), 1)
    free = mask & ~clipped
    torch.testing.assert_close(grad[free], (-adv * ratio * w / n)[free], atol=1e-9, rtol=1e-7)
    n_clipped = int((clipped & mask).sum())
    assert m["clip_frac"] == pytest.approx(n_clipped / n)


@PROPS
@given(loss_batches())
def test_is_weight_never_exceeds_cap(batch):
    new, old, behaviour, adv, mask, is_cap, _ = batch
    cap = 2.0 if is_cap is None else is_cap
    loss, m = policy_loss(new, old, adv, mask, behavior_logprobs=behaviour, is_cap=cap)
    assert m["is_weight_max"] <= cap * (1 + 1e-12)
    assert 0.0 <= m["is_truncated_frac"] <= 1.0 and m["approx_kl"] >= -1e-12
    assert math.isfinite(loss.item())


# ---------------------------------------------------------------- asymmetry diagnostics


def test_token_asymmetry_by_hand():
    d = token_asymmetry(S, T, MASK)
    torch.testing.assert_close(d, t([[0.5, -1.0, 0.0], [0.5, -2.0, 0.0], [1.0, 1.0, 1.0]]))
    torch.testing.assert_close(token_asymmetry(S[:1], T[:1]), t([[0.5, -1.0, 0.0]]))


def test_position_asymmetry_by_hand():
    # KL([.5, .5] || [.25, .75]) = .5 ln 2 + .5 ln(2/3) = 0.1438410
    p_s = torch.log(t([[0.5, 0.5], [1.0, 0.0]]))
    p_t = torch.log(t([[0.25, 0.75], [0.5, 0.5]]))
    torch.testing.assert_close(position_asymmetry(p_s, p_t), t([0.1438410, math.log(2.0)]))
    # logits are re-normalised: shifting a row changes nothing
    torch.testing.assert_close(position_asymmetry(p_s[:1] + 3.0, p_t[:1] - 1.0), t([0.1438410]))
    # P_S > 0 where P_T = 0: infinite asymmetry
    assert position_asymmetry(torch.log(t([0.5, 0.5])), torch.log(t([1.0, 0.0]))).item() == math.inf


def test_position_asymmetry_topk_exact_when_k_is_vocab():
    g = torch.Generator().manual_seed(0)
    s = torch.log_softmax(torch.randn(3, 5, 11, generator=g, dtype=torch.float64), -1)
    tt = torch.log_softmax(torch.randn(3, 5, 11, generator=g, dtype=torch.float64), -1)
    sv, si = s.topk(11, dim=-1)
    tv, ti = tt.topk(11, dim=-1)
    torch.testing.assert_close(position_asymmetry_topk(si, sv, ti, tv), position_asymmetry(s, tt))


def test_position_asymmetry_topk_by_hand():
    # vocab {0,1,2,3}; P_S = [.6,.3,.05,.05], P_T = [.2,.1,.6,.1]; k = 2
    # student top-2 = {0: .6, 1: .3}, tail .1; teacher top-2 = {2: .6, 0: .2}, tail .2
    # union U = {0, 1, 2}; each view lacks one token of U (n = 1):
    #   student's id 2: min(.3, .1 / 2) = .05 ; teacher's id 1: min(.2, .2 / 2) = .1
    # renormalised over U: S = [.6, .3, .05] / .95, T = [.2, .1, .6] / .9
    s_u = [0.6 / 0.95, 0.3 / 0.95, 0.05 / 0.95]
    t_u = [0.2 / 0.9, 0.1 / 0.9, 0.6 / 0.9]
    expected = sum(p * math.log(p / q) for p, q in zip(s_u, t_u))  # (full-vocab KL: 0.8299)
    assert expected == pytest.approx(0.85594, abs=1e-5)
    got = position_asymmetry_topk(
        torch.tensor([[0, 1]]), torch.log(t([[0.6, 0.3]])), torch.tensor([[2, 0]]), torch.log(t([[0.6, 0.2]]))
    )
    torch.testing.assert_close(got, t([expected]))
    # zero-probability entries (-inf) are legitimate: the student's k-th value -inf means no mass
    got = position_asymmetry_topk(
        torch.tensor([[0, 1]]), torch.log(t([[1.0, 0.0]])), torch.tensor([[0, 2]]), torch.log(t([[0.5, 0.5]]))
    )
    torch.testing.assert_close(got, t([math.log(2.0)]))


def test_upweighted_fraction_by_hand():
    adv = t([1.0, 1.0, -1.0])
    rew = t([1.0, 1.0, 0.0])
    s = t([[-1.0, -1.0, -3.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    tt = t([[-1.5, -1.3, -2.0], [-9.0, -9.0, -9.0], [-9.0, -9.0, -9.0]])
    mask = t([[1, 1, 1], [0, 0, 0], [1, 1, 1]], torch.bool)
    # correct tokens: row 0 only (row 1 masked, row 2 wrong); D_hat = [0.5, 0.3, -1.0]
    assert upweighted_fraction("rlrt", adv, rew, s, tt, mask) == pytest.approx(2 / 3)
    assert upweighted_fraction("rlrt_all", adv, rew, s, tt, mask) == pytest.approx(2 / 3)
    assert upweighted_fraction("rlsd", adv, rew, s, tt, mask) == pytest.approx(1 / 3)
    assert upweighted_fraction("grpo", adv, rew, s, None, mask) == 0.0
    assert upweighted_fraction("rlrt", adv, t([0.0, 0.0, 0.0]), s, tt, mask) == 0.0

    summ = asymmetry_summary("rlrt", adv, rew, s, tt, mask, lam=0.5, eps_w=0.2)
    assert summ["n_correct_tokens"] == 3.0
    assert summ["d_hat_mean"] == pytest.approx((0.5 + 0.3 - 1.0) / 3)
    assert summ["d_hat_max"] == pytest.approx(0.5) and summ["d_hat_p50"] == pytest.approx(0.3)
    assert summ["upweighted_frac"] == pytest.approx(2 / 3)
    # weights e^0.5 -> 1.2 (clipped), e^0.3 = 1.3498588 -> 1.2 (clipped), e^-1 -> 0.8 (clipped)
    assert summ["weight_mean"] == pytest.approx((1.2 + 1.2 + 0.8) / 3)
    assert summ["weight_clip_frac"] == 1.0
    assert summ["token_adv_mean_abs_shift"] == pytest.approx(0.5 * 0.2)
    assert asymmetry_summary("grpo", adv, rew, s, None, mask, lam=0.5, eps_w=0.2) == {}
    assert all(isinstance(v, float) for v in summ.values())


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("arg", "value"),
    [("advantages", float("nan")), ("rewards", float("inf")), ("student_logprobs", float("nan")),
     ("teacher_logprobs", -float("inf"))],
)
def test_non_finite_inputs_are_named(arg, value):
    kwargs = {"advantages": ADV.clone(), "rewards": REW.clone(), "student_logprobs": S.clone(),
              "teacher_logprobs": T.clone()}
    if kwargs[arg].ndim == 1:
        kwargs[arg][0] = value
    else:
        kwargs[arg][0, 1] = value  # a valid (unmasked) position
    with pytest.raises(ValueError, match=arg):
        token_advantages("rlrt", mask=MASK, lam=0.5, eps_w=0.2, **kwargs)


def test_shape_mismatches_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 2\)"):
        token_advantages("rlrt", ADV, REW, S, T[:, :2], MASK, lam=0.5, eps_w=0.2)
    with pytest.raises(ValueError, match=r"advantages has shape \(2,\).*\(3, 3\)"):
        token_advantages("rlrt", ADV[:2], REW, S, T, MASK, lam=0.5, eps_w=0.2)
    with pytest.raises(ValueError, match=r"mask"):
        token_advantages("rlrt", ADV, REW, S, T, MASK[:, :2], lam=0.5, eps_w=0.2)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[G, K\]"):
        group_advantages(t([1.0, 0.0]), norm_by_std=True)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        position_asymmetry(torch.zeros(2, 3), torch.zeros(2, 4))


def test_bad_hyperparameters_and_method_are_refused():
    with pytest.raises(ValueError, match=r"unknown advantage method 'ppo'.*grpo.*rlrt_all"):
        token_advantages("ppo", ADV, REW, S, T, MASK, lam=0.5, eps_w=0.2)
    for lam in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            token_advantages("rlrt", ADV, REW, S, T, MASK, lam=lam, eps_w=0.2)
    with pytest.raises(ValueError, match="eps_w"):
        token_advantages("rlrt", ADV, REW, S, T, MASK, lam=0.5, eps_w=-0.1)
    with pytest.raises(ValueError, match="rewards contains"):
        group_advantages(t([[1.0, float("nan")]]), norm_by_std=False)
    with pytest.raises(ValueError, match="logprobs contains"):
        policy_loss(t([[float("nan")]]), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="behavior_logprobs contains"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1),
                    behavior_logprobs=t([[float("inf")]]))
    with pytest.raises(ValueError, match="eps_low"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), eps_low=1.0)
    with pytest.raises(ValueError, match="is_cap"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), is_cap=0.0)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), dual_clip=1.0)
    with pytest.raises(ValueError, match="teacher_row_logprobs"):
        position_asymmetry(torch.zeros(1, 2), t([[float("nan"), 0.0]]))
