"""The policy update (rlrt_core.learner) and checkpoints on a real (tiny) model."""

import math

import pytest
import torch

from rlrt_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlrt_core.config import AlgorithmConfig, LearnerConfig
from rlrt_core.learner import PolicyLearner, TrainGroup, TrainSample
from rlrt_core.models import load_model
from rlrt_core.scoring import score_tokens


@pytest.fixture(scope="module")
def tiny_path():
    from rlrt_core.models import resolve_model_path

    return str(resolve_model_path("tiny"))


def _learner(tiny_path, method="rlrt", lr=1e-3, **lc):
    torch.manual_seed(0)
    model = load_model(tiny_path)
    cfg = LearnerConfig(lr=lr, warmup_steps=0, groups_per_step=2, mini_batch_groups=2, micro_batch_size=4, **lc)
    return PolicyLearner(model, cfg, AlgorithmConfig(method=method, lam_init=0.5, eps_w=0.5))


PROMPT = [1, 42, 77, 190, 12]
GOOD = [300, 301, 302]
BAD = [400, 401]


def _groups(learner, *, teacher_shift=0.0):
    """Two groups: GOOD completions rewarded, BAD ones not; behaviour log-probs from the model."""
    res = score_tokens(learner.model, [PROMPT] * 4, [GOOD, BAD, GOOD, BAD])
    groups = []
    for g in range(2):
        samples = []
        for k, resp in enumerate([GOOD, BAD, GOOD, BAD]):
            lp = res.logprobs[k, : len(resp)].tolist()
            samples.append(TrainSample(prompt_ids=PROMPT, response_ids=resp, behavior_logprobs=lp,
                                       reward=1.0 if resp is GOOD else 0.0, student_logprobs=lp,
                                       teacher_logprobs=[x - teacher_shift for x in lp]))
        groups.append(TrainGroup(group_id=f"g{g}", version=0, samples=samples))
    return groups


@pytest.mark.parametrize("method", ["grpo", "rlsd", "rlrt", "rlrt_all"])
def test_step_moves_probability_towards_rewarded_completion(tiny_path, method):
    learner = _learner(tiny_path, method=method)
    before = score_tokens(learner.model, [PROMPT, PROMPT], [GOOD, BAD]).logprobs
    for _ in range(3):
        result = learner.step(_groups(learner, teacher_shift=0.3))
        assert result.applied_updates == 1 and result.skipped_updates == 0
    after = score_tokens(learner.model, [PROMPT, PROMPT], [GOOD, BAD]).logprobs
    assert after[0, :3].sum() > before[0, :3].sum() + 0.05, "rewarded completion must become likelier"
    assert after[1, :2].sum() < before[1, :2].sum() - 0.05, "unrewarded completion must become less likely"
    m = result.metrics
    for key in ("reward/mean", "length/mean", "optim/lr", "optim/lambda", "loss/clip_frac", "loss/is_weight_mean",
                "loss/is_weight_max", "loss/approx_kl", "tokens/trained"):
        assert key in m and math.isfinite(m[key]), key
    assert m["reward/mean"] == pytest.approx(0.5)
    assert m["groups/mixed_fraction"] == 1.0
    if method != "grpo":
        # teacher log-probs are 0.3 below the student's: D̂ = +0.3 on every token
        assert m["rlrt/d_hat_mean"] == pytest.approx(0.3, abs=1e-4)
        expected_up = 1.0 if method in ("rlrt", "rlrt_all") else 0.0
        assert m["rlrt/upweighted_frac"] == pytest.approx(expected_up)


def test_non_finite_gradient_skips_update_and_keeps_weights(tiny_path):
    learner = _learner(tiny_path)
    groups = _groups(learner)
    # a non-finite parameter makes loss and gradients non-finite for this step
    emb = learner.model.get_input_embeddings().weight
    with torch.no_grad():
        emb[PROMPT[1], 0] = float("inf")
    snapshot = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
    result = learner.step(groups)
    assert result.skipped_updates == 1 and result.applied_updates == 0
    assert learner.skipped_updates_total == 1
    for k, v in learner.model.state_dict().items():
        assert torch.equal(v, snapshot[k]) or (torch.isinf(v) == torch.isinf(snapshot[k])).all(), k


def test_mismatched_logprobs_refused(tiny_path):
    learner = _learner(tiny_path)
    bad = TrainGroup("x", 0, [TrainSample(PROMPT, GOOD, [0.0], 1.0), TrainSample(PROMPT, BAD, [0.0, 0.0], 0.0)])
    with pytest.raises(ValueError, match="behaviour log-probs"):
        learner.step([bad])


def test_checkpoint_roundtrip_is_exact(tiny_path, tmp_path):
    learner = _learner(tiny_path)
    learner.step(_groups(learner))
    path = save_checkpoint(tmp_path, step=1, version=1, model=learner.model, optimizer=learner.optimizer,
                           scheduler=learner.scheduler, extra={"learner": learner.state(), "cursor": {"index": 7}})
    assert latest_checkpoint(tmp_path) == path
    expected_next = torch.rand(3)
    torch.manual_seed(123)  # disturb RNG; load must restore it

    other = _learner(tiny_path)
    ck = load_checkpoint(path, model=other.model, optimizer=other.optimizer, scheduler=other.scheduler)
    assert (ck.step, ck.version, ck.state["extra"]["cursor"]["index"]) == (1, 1, 7)
    assert torch.equal(torch.rand(3), expected_next)
    for (k, a), (_, b) in zip(learner.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), k
    sa, sb = learner.optimizer.state_dict(), other.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for idx, st in sa["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][idx][name])), (idx, name)
    assert learner.scheduler.state_dict() == other.scheduler.state_dict()
    # the same next step from both gives the same weights
    other.load_state(ck.state["extra"]["learner"])
    learner.step(_groups(learner))
    other.step(_groups(other))
    for (k, a), (_, b) in zip(learner.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_checkpoint_keeps_only_the_newest(tiny_path, tmp_path):
    model = load_model(tiny_path)
    for step in range(1, 5):
        save_checkpoint(tmp_path, step=step, version=step, model=model, keep=2)
    names = sorted(p.name for p in tmp_path.glob("step_*"))
    assert names == ["step_000003", "step_000004"]
    assert latest_checkpoint(tmp_path).name == "step_000004"
    # a half-written checkpoint (no state.json) is never picked
    (tmp_path / "step_000009").mkdir()
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_000004"


@pytest.mark.parametrize("method", ["rlrt", "grpo"])
def test_one_update_takes_pi_old_from_the_training_forward(tiny_path, method):
    """One PPO epoch, one mini-batch: π_old is the training forward detached, with the same
    loss, gradient and update as a separate π_old pass (which such a step no longer runs)."""
    fused, separate = _learner(tiny_path, method=method), _learner(tiny_path, method=method)
    groups = _groups(fused)
    for g in groups:  # behaviour != π_old, so the truncated IS weights see π_old's values
        for s in g.samples:
            s.behavior_logprobs = [x - 0.3 * (i % 2) for i, x in enumerate(s.behavior_logprobs)]
    passes = []
    fused._old_logprobs = lambda *a: passes.append(a) or pytest.fail("separate π_old pass")
    separate._one_update = lambda n: False  # the path a multi-update step takes
    ra, rb = fused.step(groups), separate.step(groups)
    assert not passes and ra.applied_updates == rb.applied_updates == 1
    for k in ("loss/loss", "loss/is_weight_mean", "optim/grad_norm"):
        assert ra.metrics[k] == pytest.approx(rb.metrics[k], rel=1e-6, abs=1e-9), k
    assert ra.metrics["loss/is_weight_mean"] != pytest.approx(1.0)
    for (k, a), (_, b) in zip(fused.model.state_dict().items(), separate.model.state_dict().items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), k


def test_several_updates_keep_the_separate_pi_old_pass(tiny_path):
    # two mini-batches: the second trains on weights the first moved, so π_old is a pass of its own
    learner = PolicyLearner(load_model(tiny_path), LearnerConfig(lr=1e-3, warmup_steps=0, groups_per_step=2,
                                                                 mini_batch_groups=1, micro_batch_size=4),
                            AlgorithmConfig(method="rlrt", lam_init=0.5, eps_w=0.5))
    calls = []
    orig = learner._old_logprobs
    learner._old_logprobs = lambda *a: calls.append(1) or orig(*a)
    res = learner.step(_groups(learner))
    assert calls == [1] and res.applied_updates == 2


@pytest.mark.parametrize("one_update", [True, False])
def test_student_view_drift_measures_the_teacher_views_staleness(tiny_path, one_update):
    """rlrt/student_view_drift = mean |log π_old − student view| over scored tokens: ~0 when the
    teacher scored the student view on the learner's weights, the offset when it did not; from
    the training forward (one update) and from the separate π_old pass alike."""
    for shift, want in ((0.0, 0.0), (0.25, 0.25)):
        learner = _learner(tiny_path)
        if not one_update:
            learner._one_update = lambda n: False
        groups = _groups(learner)
        for s in groups[0].samples:  # one group's student view came from other weights
            s.student_logprobs = [x + shift for x in s.student_logprobs]
        for s in groups[1].samples:  # a group the teacher did not score does not count
            s.student_logprobs = [x - 5.0 for x in s.student_logprobs]
            s.teacher_logprobs = None
        got = learner.step(groups).metrics["rlrt/student_view_drift"]
        assert got == pytest.approx(want, abs=1e-5)
    grpo = _learner(tiny_path, method="grpo")
    assert "rlrt/student_view_drift" not in grpo.step(_groups(grpo)).metrics
