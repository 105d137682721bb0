"""Codec: tensors, stage helpers and validation of trajectory messages."""

from __future__ import annotations

import pytest
import torch

from rlrt_core.data import Problem
from rlrt_core.engines import Completion, GenerationResult
from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.reward import VerifyResult
from rlrt_core.transport import codec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                                   torch.uint8, torch.bool, torch.float64])
def test_tensor_round_trip(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 5) * 10).to(dtype)
    back = codec.tensor_from_proto(pb.Tensor.FromString(codec.tensor_to_proto(t).SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    back.add_(1) if dtype != torch.bool else back.logical_not_()  # writable, own memory


def test_tensor_edge_shapes() -> None:
    for t in (torch.tensor(3.5), torch.zeros(0, 4), torch.arange(6).reshape(2, 3).t()):  # scalar, empty, non-contiguous
        back = codec.tensor_from_proto(codec.tensor_to_proto(t))
        assert back.shape == t.shape and torch.equal(back, t)


def test_tensor_bad_input_names_problem() -> None:
    with pytest.raises(codec.MalformedMessage, match="needs 24 bytes"):
        codec.tensor_from_proto(pb.Tensor(dtype="F32", shape=[2, 3], data=bytes(20)))
    with pytest.raises(codec.MalformedMessage, match="unknown tensor dtype"):
        codec.tensor_from_proto(pb.Tensor(dtype="Q4", shape=[1], data=bytes(1)))


def _pipeline_group() -> pb.RolloutGroup:
    task = codec.prompt_task("g1", "run", Problem(id="p1", prompt="2+3=", answer="5"),
                             n_samples=3, min_version=4, dispatched_at=10.0)
    gen = GenerationResult(prompt_ids=[1, 2, 3], version=5, completions=[
        Completion([7, 8, 9], [-0.1, -0.2, -0.3], "stop", "5"),
        Completion([7], [-1.5], "stop", "6"),
        Completion([7, 8], [-0.5, -0.25], "length", "55"),
    ])
    g = codec.rollout_group(task, gen, engine="torch", worker_id="w0", generation_s=1.5)
    codec.set_verifier_results(g, [VerifyResult(1.0, "5", None, False), VerifyResult(0.0, "6", "wrong", False),
                                   VerifyResult(0.0, None, "timeout", True)])
    from rlrt_core.teacher_scoring import RolloutScore

    s0 = torch.tensor([-0.1, -0.2, -0.3])
    s1 = torch.tensor([-1.5])
    codec.set_rollout_scores(g, [
        RolloutScore("solution", -1, s0, s0 - 0.5, position_kl=torch.rand(3), support_ids=torch.randint(0, 100, (3, 2)),
                     teacher_support_logprobs=-torch.rand(3, 2)),
        RolloutScore("peer", 0, s1, s1 - 0.5),
        None,  # not scored by the method
    ], teacher_version=5)
    return g


def test_stage_helpers_and_train_group() -> None:
    from rlrt_core.learner import train_group

    g = codec.decode(codec.encode(_pipeline_group()), pb.RolloutGroup)
    assert g.problem.answer == "5" and not g.problem.HasField("solution")
    assert g.version == 5 and g.min_version == 4 and g.timestamps.dispatched_at == 10.0
    assert g.verifier_results[2].timed_out and not g.verifier_results[0].HasField("reason")
    assert g.teacher_scores[1].context_kind == pb.CONTEXT_KIND_PEER and g.teacher_scores[1].peer_index == 0
    assert list(g.teacher_scores[1].teacher_logprobs) == [pytest.approx(-2.0)]
    assert g.teacher_scores[2].context_kind == pb.CONTEXT_KIND_UNSPECIFIED and not g.teacher_scores[2].student_logprobs
    assert codec.tensor_from_proto(g.teacher_scores[0].support_ids).shape == (3, 2)
    assert len(g.teacher_scores[0].position_kl) == 3
    t = train_group(g)
    assert [s.response_ids for s in t.samples] == [[7, 8, 9], [7], [7, 8]]
    assert [s.reward for s in t.samples] == [1.0, 0.0, 0.0]
    assert t.samples[0].teacher_logprobs == pytest.approx([-0.6, -0.7, -0.8])
    assert t.samples[0].support_ids.shape == (3, 2) and t.samples[1].support_ids is None
    assert t.samples[2].student_logprobs is None  # weight 1
    assert t.samples[0].behavior_logprobs == pytest.approx([-0.1, -0.2, -0.3])


def test_rollout_group_refuses_stale_engine() -> None:
    task = codec.prompt_task("g", "run", {"id": "p", "prompt": "q", "answer": "a"}, n_samples=1, min_version=3)
    assert not task.problem.HasField("solution")  # a plain mapping works too
    with pytest.raises(ValueError, match="min_version 3"):
        codec.rollout_group(task, GenerationResult([1], [Completion([2], [-1.0], "stop", "x")], version=2),
                            engine="torch", worker_id="w")


@pytest.mark.parametrize("mutate,match", [
    (lambda g: setattr(g, "group_id", ""), "empty group_id"),
    (lambda g: g.completions[0].logprobs.append(-1.0), "4 log-probs for 3 tokens"),
    (lambda g: g.verifier_results.pop(), "2 verifier_results for 3 completions"),
    (lambda g: g.teacher_scores[0].student_logprobs.pop(), "teacher score 0"),
])
def test_validation_names_the_problem(mutate, match) -> None:
    g = _pipeline_group()
    mutate(g)
    with pytest.raises(codec.MalformedMessage, match=match):
        codec.decode(g.SerializeToString(), pb.RolloutGroup)


def _streamed_group() -> pb.RolloutGroup:
    """A group whose completions crossed in-flight weight updates (versions 4 -> 5 -> 6)."""
    task = codec.prompt_task("g2", "run", Problem(id="p2", prompt="q", answer="a"), n_samples=2, min_version=4)
    gen = GenerationResult(prompt_ids=[1, 2], version=6, completions=[
        Completion([7, 8, 9], [-0.1, -0.2, -0.3], "stop", "x", token_versions=[5, 5, 6]),
        Completion([7, 8], [-0.5, -0.25], "length", "y", token_versions=[4, 6]),
    ])
    return codec.rollout_group(task, gen, engine="torch", worker_id="w0")


def test_token_versions_round_trip_and_group_version_is_the_oldest() -> None:
    g = codec.decode(codec.encode(_streamed_group()), pb.RolloutGroup, limits=codec.Limits(max_version=6))
    assert [list(c.token_versions) for c in g.completions] == [[5, 5, 6], [4, 6]]
    assert g.version == 4  # not the result's 6: the learner's staleness filter reads this
    g.verifier_results.add(reward=1.0)
    g.verifier_results.add(reward=0.0)
    from rlrt_core.learner import train_group

    assert train_group(g).version == 4
    # a batch-synchronous group without per-token versions stays valid
    old = _pipeline_group()
    for c in old.completions:
        del c.token_versions[:]
    codec.validate(old)


@pytest.mark.parametrize("mutate,match", [
    (lambda g: g.completions[0].token_versions.pop(), "2 token versions for 3 tokens"),
    (lambda g: g.completions[0].token_versions.__setitem__(1, 3), "token version 3 < the group's min_version 4"),
    (lambda g: g.completions[0].token_versions.__setitem__(2, 5) or g.completions[0].token_versions.__setitem__(1, 6),
     "token versions decrease"),
    (lambda g: g.completions[1].token_versions.__setitem__(1, 9), "token version 9 ahead of the newest version 8"),
    (lambda g: setattr(g, "version", 5), "token version 4 older than the group's version 5"),
    (lambda g: g.completions[1].token_versions.__setitem__(0, 5), "has version 4, but its oldest token was generated by version 5"),
])
def test_token_version_validation_names_the_problem(mutate, match) -> None:
    g = _streamed_group()
    codec.validate(g, codec.Limits(max_version=8))
    mutate(g)
    with pytest.raises(codec.MalformedMessage, match=match):
        codec.validate(g, codec.Limits(max_version=8))


def test_undecodable_bytes() -> None:
    with pytest.raises(codec.MalformedMessage, match="cannot decode rlrt.v1.RolloutGroup"):
        codec.decode(b"\xff\xff\xff\xff not a protobuf", pb.RolloutGroup)
    with pytest.raises(codec.MalformedMessage, match="no 'data' field"):
        codec.decode(None, pb.PromptTask)


def test_version_hasher_depends_on_every_part() -> None:
    def digest(name="w", dtype="F32", shape=(2,), data=bytes(8)) -> str:
        h = codec.VersionHasher()
        h.begin_tensor(name, dtype, shape, len(data))
        h.update(data)
        return h.hexdigest()

    base = digest()
    assert base == digest()
    assert len({base, digest(name="v"), digest(dtype="I32"), digest(shape=(1, 2)), digest(data=b"\x01" + bytes(7))}) == 5
