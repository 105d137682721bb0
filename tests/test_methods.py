"""Methods as data (rlrt_core.methods): the spec registry, config validation, plugins, and which
rollouts the teacher scores, all on one definition of a correct rollout."""

from __future__ import annotations

import sys
import textwrap
import uuid

import pytest
import torch

from rlrt_core import algorithms
from rlrt_core.config import AlgorithmConfig, ConfigError, TeacherConfig, build_config
from rlrt_core.losses import get_loss, loss_names
from rlrt_core.methods import (
    CORRECT_REWARD,
    MethodSpec,
    correct_mask,
    get_method,
    is_correct,
    method_names,
    register_method,
    rollouts_to_score,
    unregister_method,
)
from rlrt_core.teacher_scoring import choose_context

BUILTINS = ("grpo", "rlsd", "rlrt", "rlrt_all", "grpo_eb", "sdpo", "srpo")


def test_builtins_registered_with_their_losses():
    assert set(BUILTINS) <= set(method_names())
    assert {"ppo", "sdpo", "srpo"} <= set(loss_names())
    for name in BUILTINS:
        spec = get_method(name)
        assert spec.name == name and get_loss(spec.loss).name == spec.loss
    assert [get_method(n).loss for n in BUILTINS] == ["ppo"] * 5 + ["sdpo", "srpo"]
    assert get_method("sdpo").weight is None and get_method("sdpo").needs_topk
    assert get_method("srpo").needs_teacher_entropy and get_method("srpo").teacher_scores == "failed"
    assert not get_method("grpo").needs_teacher and not get_method("grpo_eb").needs_teacher
    assert get_method("grpo_eb").entropy_coef > 0 and get_method("grpo").entropy_coef == 0
    # Table 5: std normalisation off for GRPO, SDPO, SRPO; on for RLSD, RLRT
    assert {n: get_method(n).norm_by_std for n in BUILTINS} == {
        "grpo": False, "rlsd": True, "rlrt": True, "rlrt_all": True, "grpo_eb": False, "sdpo": False, "srpo": False}


def test_unknown_method_lists_registered_names():
    with pytest.raises(ValueError, match=r"unknown method 'ppo'; registered methods: .*grpo, grpo_eb, rlrt.*srpo"):
        get_method("ppo")
    with pytest.raises(ConfigError, match=r"algorithm\.method.*unknown method 'nope'.*rlrt_all.*sdpo"):
        build_config({"algorithm": {"method": "nope"}}, use_env=False)


def test_spec_rejects_bad_fields_and_duplicates():
    with pytest.raises(ValueError, match="teacher_scores"):
        MethodSpec("x", None, teacher_scores="some")
    with pytest.raises(ValueError, match="score_groups"):
        MethodSpec("x", None, score_groups="odd")
    with pytest.raises(ValueError, match="scores no rollout"):
        MethodSpec("x", None, teacher_scores="none", needs_topk=True)
    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodSpec("rlrt", None))


def test_one_definition_of_correct():
    assert CORRECT_REWARD == 1.0
    assert [is_correct(r) for r in (0.0, 0.5, 0.75, 0.999, 1.0)] == [False, False, False, False, True]
    rewards = [1.0, 0.75, 0.0, 1.0]  # 0.75: not correct, for the gate and for the teacher alike
    _, gate = get_method("rlrt").weight(torch.ones(4), torch.tensor(rewards), torch.zeros(4, 2), torch.zeros(4, 2))
    assert gate.tolist() == [True, False, False, True] == correct_mask(torch.tensor(rewards)).tolist()
    assert rollouts_to_score(get_method("rlrt"), rewards) == [0, 3]
    assert rollouts_to_score(get_method("srpo"), rewards) == [1, 2]
    texts = ["7", "7.", "8", "seven"]
    # the peer context of rollout 0 is the next correct rollout (3), never the 0.75 one
    assert choose_context("peer", None, texts, rewards, 0) == ("seven", "peer", 3)


def test_config_reads_spec_defaults_and_recipe_overrides():
    assert AlgorithmConfig(method="grpo_eb").entropy_coef == get_method("grpo_eb").entropy_coef
    assert AlgorithmConfig(method="grpo_eb", entropy_coef=0.01).entropy_coef == 0.01
    assert AlgorithmConfig(method="grpo").entropy_coef == 0.0
    assert AlgorithmConfig(method="sdpo").std_normalised is False
    assert AlgorithmConfig(method="sdpo", norm_by_std=True).std_normalised is True
    assert AlgorithmConfig(method="rlrt").std_normalised is True
    algo = AlgorithmConfig(method="sdpo")
    assert (algo.distill_topk, algo.distill_alpha, algo.distill_is_clip, algo.distill_kl_clip) == (100, 0.5, 2.0, None)
    assert algo.teacher_context(TeacherConfig()) == "peer"
    assert algo.teacher_context(TeacherConfig(context="solution")) == "solution"
    assert AlgorithmConfig(method="rlrt").teacher_context(TeacherConfig()) == "solution_or_peer"
    # a whole RunConfig resolves an unset teacher.context to the method's default
    assert build_config({"algorithm": {"method": "srpo"}}, use_env=False).teacher.context == "peer"
    assert build_config({"algorithm": {"method": "sdpo"}, "teacher": {"context": "solution"}},
                        use_env=False).teacher.context == "solution"


def test_plugin_module_outside_the_package_registers_a_method(tmp_path, monkeypatch):
    mod = f"rlrt_test_plugin_{uuid.uuid4().hex[:8]}"
    name = f"half_{mod}"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent(f'''
        import torch
        from rlrt_core.methods import register_method

        @register_method("{name}")
        def half(advantages, rewards, student, teacher):
            return torch.full_like(student, 0.5), torch.ones_like(rewards, dtype=torch.bool)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ConfigError, match=name):  # not registered until the plugin is imported
            build_config({"algorithm": {"method": name}}, use_env=False)
        cfg = build_config({"algorithm": {"plugins": [mod], "method": name}}, use_env=False)
        assert cfg.algorithm.method == name and cfg.algorithm.spec.loss == "ppo"
        assert cfg.algorithm.std_normalised is True  # the simple path's RLRT-family defaults
        assert rollouts_to_score(cfg.algorithm.spec, [1.0, 0.0]) == [0, 1]
        a, r = torch.tensor([1.0]), torch.tensor([1.0])
        out = algorithms.token_advantages(name, a, r, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                                          lam=1.0, eps_w=1.0)
        torch.testing.assert_close(out, torch.full((1, 2), 0.5))
        # a second validation does not re-register (the module is imported once)
        build_config({"algorithm": {"plugins": [mod], "method": name}}, use_env=False)
    finally:
        unregister_method(name)
        sys.modules.pop(mod, None)


def test_plugin_import_failure_names_field_and_module(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"algorithm\.plugins: cannot import module 'no_such_rlrt_plugin'"):
        build_config({"algorithm": {"plugins": ["no_such_rlrt_plugin"]}}, use_env=False)
    (tmp_path / "rlrt_broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"algorithm\.plugins.*'rlrt_broken_plugin'.*RuntimeError: boom"):
        build_config({"algorithm": {"plugins": ["rlrt_broken_plugin"]}}, use_env=False)
    sys.modules.pop("rlrt_broken_plugin", None)


def test_weight_view_is_the_registry():
    name = "test_view_method"
    algorithms.ADVANTAGE_METHODS[name] = lambda a, r, s, t: (torch.ones_like(s), torch.zeros_like(r, dtype=torch.bool))
    assert name in method_names() and get_method(name).loss == "ppo"
    algorithms.ADVANTAGE_METHODS.pop(name)
    assert name not in method_names()
    assert "sdpo" not in algorithms.ADVANTAGE_METHODS  # no weight function
    with pytest.raises(ValueError, match="no token weight"):
        algorithms.token_advantages("sdpo", torch.ones(1), torch.ones(1), torch.zeros(1, 1), torch.zeros(1, 1),
                                    torch.ones(1, 1), lam=0.5, eps_w=0.2)
