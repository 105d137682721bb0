"""Which rollouts the teacher scores, and with what privileged context (rlrt_core.methods,
rlrt_core.teacher_scoring; the teacher service calls these)."""

import pytest

from rlrt_core.methods import get_method, rollouts_to_score
from rlrt_core.teacher_scoring import choose_context


@pytest.mark.parametrize("name,mixed,all_right,all_wrong", [
    ("grpo", [], [], []),
    ("grpo_eb", [], [], []),
    ("rlsd", [0, 1, 2, 3], [], []),
    ("rlrt", [0, 2], [], []),
    ("rlrt_all", [0, 1, 2, 3], [], []),
    ("sdpo", [0, 1, 2, 3], [0, 1, 2, 3], []),     # groups with a success, all rollouts, even all-correct ones
    ("srpo", [1, 3], [], []),                     # only failed rollouts of groups with a success
])
def test_rollouts_to_score_every_builtin(name, mixed, all_right, all_wrong):
    spec = get_method(name)
    assert rollouts_to_score(spec, [1.0, 0.0, 1.0, 0.0]) == mixed
    assert rollouts_to_score(spec, [1.0] * 4) == all_right
    assert rollouts_to_score(spec, [0.0] * 4) == all_wrong
    assert rollouts_to_score(spec, []) == []


def test_context_prefers_solution_then_a_successful_peer_never_itself():
    texts = ["7", "8", "The answer is 7", ""]
    rewards = [1.0, 0.0, 1.0, 0.0]
    assert choose_context("solution_or_peer", "3 + 4 = 7", texts, rewards, 0) == ("3 + 4 = 7", "solution", -1)
    assert choose_context("solution_or_peer", None, texts, rewards, 0) == ("The answer is 7", "peer", 2)
    assert choose_context("peer", "ignored", texts, rewards, 2) == ("7", "peer", 0)
    assert choose_context("peer", None, ["7", "8"], [1.0, 0.0], 0) == (None, "none", -1)
    assert choose_context("solution", None, texts, rewards, 0) == (None, "none", -1)
    with pytest.raises(ValueError, match="unknown teacher context"):
        choose_context("oracle", None, texts, rewards, 0)
