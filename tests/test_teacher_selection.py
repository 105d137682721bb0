"""Which rollouts the teacher scores, and with what privileged context (services/teacher)."""

from rlrt_core.proto import trajectory_pb2 as pb
from services.teacher.main import choose_context, rollouts_to_score


def test_rollouts_to_score_follows_each_methods_gate():
    mixed = [1.0, 0.0, 1.0, 0.0]
    assert rollouts_to_score("grpo", mixed) == []
    assert rollouts_to_score("rlrt", mixed) == [0, 2]           # eq. 7: correct rollouts only
    assert rollouts_to_score("rlsd", mixed) == [0, 1, 2, 3]     # all rollouts
    assert rollouts_to_score("rlrt_all", mixed) == [0, 1, 2, 3]
    for method in ("rlrt", "rlsd", "rlrt_all"):                 # uniform rewards: A = 0, nothing to weight
        assert rollouts_to_score(method, [1.0] * 4) == []
        assert rollouts_to_score(method, [0.0] * 4) == []


def test_context_prefers_solution_then_a_successful_peer_never_itself():
    texts = ["7", "8", "The answer is 7", ""]
    rewards = [1.0, 0.0, 1.0, 0.0]
    assert choose_context("solution_or_peer", "3 + 4 = 7", texts, rewards, 0) == ("3 + 4 = 7", pb.CONTEXT_KIND_SOLUTION, -1)
    assert choose_context("solution_or_peer", None, texts, rewards, 0) == ("The answer is 7", pb.CONTEXT_KIND_PEER, 2)
    assert choose_context("peer", "ignored", texts, rewards, 2) == ("7", pb.CONTEXT_KIND_PEER, 0)
    assert choose_context("peer", None, texts, rewards, 1) == ("7", pb.CONTEXT_KIND_PEER, 0)
    # the only correct rollout has no other successful peer: no context (weight 1, counted)
    assert choose_context("peer", None, ["7", "8"], [1.0, 0.0], 0) == (None, pb.CONTEXT_KIND_NONE, -1)
    assert choose_context("solution", None, texts, rewards, 0) == (None, pb.CONTEXT_KIND_NONE, -1)
