"""Teacher scorer library -> protobuf -> learner, on the tiny model: what each method's teacher
ships (rlrt_core.teacher_scoring), how it travels (codec.set_rollout_scores, learner.train_group),
and what the learner does with it (PolicyLearner.step for sdpo, srpo and grpo_eb)."""

from __future__ import annotations

import math

import pytest
import torch

from rlrt_core import algorithms
from rlrt_core.config import AlgorithmConfig, LearnerConfig, TeacherConfig
from rlrt_core.data import Problem
from rlrt_core.engines import Completion, GenerationResult
from rlrt_core.learner import PolicyLearner, train_group
from rlrt_core.methods import get_method
from rlrt_core.models import load_model, load_tokenizer
from rlrt_core.prompts import student_prompt_ids, teacher_prompt_ids
from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.reward import VerifyResult
from rlrt_core.scoring import score_tokens
from rlrt_core.teacher_scoring import score_group
from rlrt_core.transport import codec

PROMPT = "2+3="
TEXTS = ["5", "6", "The answer is 5", "7"]
REWARDS = [1.0, 0.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def _model():
    torch.manual_seed(0)
    return load_model("tiny")


def _group(model, tok, gid="g0") -> pb.RolloutGroup:
    """A verified group whose completions are the token ids of TEXTS, behaviour log-probs from the model."""
    prompt_ids = student_prompt_ids(tok, PROMPT)
    responses = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    lp = score_tokens(model, [prompt_ids] * len(responses), responses).logprobs
    task = codec.prompt_task(gid, "run", Problem(id="p", prompt=PROMPT, answer="5"), n_samples=4, min_version=0)
    gen = GenerationResult(prompt_ids=prompt_ids, version=0, completions=[
        Completion(r, lp[i, :len(r)].tolist(), "stop", t) for i, (r, t) in enumerate(zip(responses, TEXTS))])
    g = codec.rollout_group(task, gen, engine="torch", worker_id="w")
    codec.set_verifier_results(g, [VerifyResult(r, None, None, False) for r in REWARDS])
    return g


def _score(model, tok, g, method, *, topk=0, distill_topk=8):
    spec = get_method(method)
    algo = AlgorithmConfig(method=method)
    scores = score_group(model, tok, spec, prompt_text=g.problem.prompt, prompt_ids=list(g.prompt_ids),
                         solution=g.problem.solution if g.problem.HasField("solution") else None,
                         completions_token_ids=[list(c.token_ids) for c in g.completions],
                         completion_texts=[c.text for c in g.completions],
                         rewards=[v.reward for v in g.verifier_results],
                         context=algo.teacher_context(TeacherConfig()), topk=topk, distill_topk=distill_topk)
    codec.set_rollout_scores(g, scores, teacher_version=3)
    return scores, codec.decode(codec.encode(g), pb.RolloutGroup)


def test_sdpo_teacher_ships_student_topk_support_and_teacher_logprobs_there(tok):
    model = _model()
    g = _group(model, tok)
    scores, back = _score(model, tok, g, "sdpo", topk=4, distill_topk=8)
    assert [s.context_kind for s in scores] == ["peer"] * 4
    assert [s.peer_index for s in scores] == [2, 0, 0, 0]  # a successful sibling, never itself
    for i, s in enumerate(scores):
        n = len(g.completions[i].token_ids)
        resp = list(g.completions[i].token_ids)
        student = score_tokens(model, [list(g.prompt_ids)], [resp], topk=8)
        teacher_ids = teacher_prompt_ids(tok, PROMPT, TEXTS[s.peer_index])
        teacher = score_tokens(model, [teacher_ids], [resp], topk=4, support_ids=student.topk_ids)
        assert s.support_ids.shape == (n, 8) and s.support_ids.dtype == torch.int64
        assert torch.equal(s.support_ids, student.topk_ids[0, :n])
        torch.testing.assert_close(s.teacher_support_logprobs, teacher.support_logprobs[0, :n])
        torch.testing.assert_close(s.student_logprobs, student.logprobs[0, :n])
        torch.testing.assert_close(s.teacher_logprobs, teacher.logprobs[0, :n])
        assert s.position_kl.shape == (n,) and (s.position_kl >= 0).all() and s.teacher_entropy is None
        # what travelled is what was scored
        ts = back.teacher_scores[i]
        assert ts.context_kind == pb.CONTEXT_KIND_PEER and ts.teacher_version == 3
        assert torch.equal(codec.tensor_from_proto(ts.support_ids), s.support_ids)
        assert torch.equal(codec.tensor_from_proto(ts.teacher_support_logprobs), s.teacher_support_logprobs)
    tg = train_group(back)
    assert all(x.support_ids is not None and x.support_ids.shape[-1] == 8 for x in tg.samples)


def test_srpo_scores_failed_rollouts_with_teacher_entropy_and_rlrt_needs_no_rows(tok):
    model = _model()
    scores, back = _score(model, tok, _group(model, tok), "srpo")
    assert [s is not None for s in scores] == [False, True, False, True]
    assert [ts.context_kind for ts in back.teacher_scores] == [pb.CONTEXT_KIND_UNSPECIFIED, pb.CONTEXT_KIND_PEER,
                                                               pb.CONTEXT_KIND_UNSPECIFIED, pb.CONTEXT_KIND_PEER]
    n = len(back.completions[1].token_ids)
    assert scores[1].teacher_entropy.shape == (n,) and (scores[1].teacher_entropy > 0).all()
    assert list(back.teacher_scores[1].teacher_entropy) == pytest.approx(scores[1].teacher_entropy.tolist())
    tg = train_group(back)
    assert [x.support_ids is not None for x in tg.samples] == [False, True, False, True]
    assert tg.samples[1].teacher_entropy is not None and tg.samples[0].teacher_entropy is None

    scores, back = _score(model, tok, _group(model, tok), "rlrt")
    assert [s is not None for s in scores] == [True, False, True, False]
    assert scores[0].support_ids is None and not back.teacher_scores[0].HasField("support_ids")


def test_codec_refuses_inconsistent_support_rows(tok):
    model = _model()
    _, back = _score(model, tok, _group(model, tok), "sdpo")
    bad = pb.RolloutGroup.FromString(back.SerializeToString())
    n = len(back.completions[2].token_ids)
    assert n > 1
    bad.teacher_scores[2].support_ids.CopyFrom(codec.tensor_to_proto(torch.zeros(n + 1, 8, dtype=torch.long)))
    with pytest.raises(codec.MalformedMessage, match="support_ids has shape"):
        codec.validate(bad)
    bad = pb.RolloutGroup.FromString(back.SerializeToString())
    bad.teacher_scores[0].ClearField("teacher_support_logprobs")
    with pytest.raises(codec.MalformedMessage, match="must come together"):
        codec.validate(bad)
    bad = pb.RolloutGroup.FromString(back.SerializeToString())
    bad.teacher_scores[0].teacher_entropy.extend([1.0] * 50)
    with pytest.raises(codec.MalformedMessage, match="teacher entropies"):
        codec.validate(bad)


def _learner(model, method, lr=1e-3, **algo):
    cfg = LearnerConfig(lr=lr, warmup_steps=0, groups_per_step=2, mini_batch_groups=2, micro_batch_size=3)
    return PolicyLearner(model, cfg, AlgorithmConfig(method=method, distill_topk=8, **algo))


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _support_divergence(model, groups) -> float:
    """Mean SDPO divergence over the scored tokens under the model's current weights."""
    total, n = 0.0, 0
    for g in groups:
        for s in g.samples:
            if s.support_ids is None:
                continue
            res = score_tokens(model, [s.prompt_ids], [s.response_ids], support_ids=s.support_ids[None])
            d = algorithms.self_distillation_divergence(res.support_logprobs[0], s.teacher_support_logprobs, alpha=0.5)
            total, n = total + float(d.sum()), n + d.numel()
    return total / n


@pytest.mark.parametrize("method,keys", [
    ("sdpo", ("loss/loss", "loss/distill", "loss/distill_is_ratio_mean")),
    ("srpo", ("loss/loss", "loss/distill", "loss/pg_loss", "loss/sdpo_token_frac", "loss/clip_frac")),
])
def test_distillation_methods_train_on_teacher_rows(tok, method, keys):
    model = _model()
    groups = [train_group(_score(model, tok, _group(model, tok, gid), method)[1]) for gid in ("a", "b")]
    # The random tiny model barely reads its context (D ~ 1e-4): give the teacher a clear target,
    # most mass on the student's second-ranked token, so the pull toward P_T is measurable.
    target = torch.tensor([0.05, 0.6] + [0.05] * 6).log()
    for g in groups:
        for s in g.samples:
            if s.teacher_support_logprobs is not None:
                s.teacher_support_logprobs = target.expand_as(s.teacher_support_logprobs).clone()
    # One small step: the behaviour log-probs are the model's own (IS ratio 1); later steps on the
    # same stale groups would see the IS weight of the moved policy.
    learner = _learner(model, method, lr=1e-4)
    before, div0 = _params(model), _support_divergence(model, groups)
    result = learner.step(groups)
    assert result.applied_updates == 1 and result.skipped_updates == 0
    m = result.metrics
    assert m["loss/distill_is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    for key in keys:
        assert key in m and math.isfinite(m[key]), key
    assert m["loss/distill"] > 0 and math.isfinite(m["optim/grad_norm"]) and m["optim/grad_norm"] > 0
    if method == "srpo":  # half the tokens of the step are failed rollouts with a teacher
        assert 0 < m["loss/sdpo_token_frac"] < 1
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if method == "sdpo":  # distillation alone pulls P_S toward P_T on the support
        assert _support_divergence(model, groups) < div0


def test_sdpo_without_any_teacher_target_does_not_update(tok):
    model = _model()
    g = _group(model, tok)
    codec.set_rollout_scores(g, [None] * 4, teacher_version=0)
    learner = _learner(model, "sdpo")
    before = _params(model)
    result = learner.step([train_group(g)])
    assert result.applied_updates == 0 and "loss/distill" not in result.metrics
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_grpo_eb_adds_the_entropy_bonus_from_the_spec_default(tok):
    model = _model()
    groups = [train_group(_group(model, tok, gid)) for gid in ("a", "b")]
    learner = _learner(model, "grpo_eb")
    assert learner.algo.entropy_coef == get_method("grpo_eb").entropy_coef > 0
    before = _params(model)
    m = learner.step(groups).metrics
    assert m["loss/entropy"] > 0 and m["loss/loss"] == pytest.approx(m["loss/pg_loss"] - 1e-3 * m["loss/entropy"],
                                                                       rel=1e-4, abs=1e-7)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # plain GRPO computes no entropy at all
    plain = _learner(_model(), "grpo").step(groups).metrics
    assert "loss/entropy" not in plain


def test_bad_support_rows_are_refused_before_any_update(tok):
    model = _model()
    g = train_group(_score(model, tok, _group(model, tok), "sdpo")[1])
    learner = _learner(model, "sdpo")
    before = _params(model)
    s = g.samples[2]
    good_ids, good_lp = s.support_ids, s.teacher_support_logprobs
    s.support_ids = good_ids + 49152
    with pytest.raises(ValueError, match="group g0 sample 2: support ids outside the vocabulary"):
        learner.step([g])
    s.support_ids = good_ids[:-1]
    with pytest.raises(ValueError, match="group g0 sample 2: support rows"):
        learner.step([g])
    s.support_ids, s.teacher_support_logprobs = good_ids, None
    with pytest.raises(ValueError, match="must come together"):
        learner.step([g])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # mixed support sizes: the step uses the smallest k (the top columns of each row)
    s.teacher_support_logprobs = good_lp
    g.samples[0].support_ids = g.samples[0].support_ids[:, :4]
    g.samples[0].teacher_support_logprobs = g.samples[0].teacher_support_logprobs[:, :4]
    assert learner.step([g]).applied_updates == 1
