"""Typed configuration: recipes load, bad values and unknown keys are refused by name."""

from pathlib import Path

import pytest

from rlrt_core.config import ConfigError, RunConfig, build_config, dump_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_validate():
    cfg = build_config({}, use_env=False)
    assert isinstance(cfg, RunConfig)
    assert cfg.algorithm.method == "rlrt"
    assert cfg.algorithm.std_normalised is True
    assert build_config({"algorithm": {"method": "grpo"}}, use_env=False).algorithm.std_normalised is False


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_validates(path):
    cfg = load_config(path, use_env=False)
    # round trip: the dumped effective config is itself a valid recipe
    import yaml

    assert build_config(yaml.safe_load(dump_config(cfg)), use_env=False) == cfg


def test_unknown_key_named():
    with pytest.raises(ConfigError, match=r"learner\.lrr: unknown key"):
        build_config({"learner": {"lrr": 1e-5}}, use_env=False)


def test_out_of_range_named():
    with pytest.raises(ConfigError, match=r"algorithm\.lam_init"):
        build_config({"algorithm": {"lam_init": 1.5}}, use_env=False)
    with pytest.raises(ConfigError, match=r"rollout\.n_samples"):
        build_config({"rollout": {"n_samples": 0}}, use_env=False)
    with pytest.raises(ConfigError, match=r"algorithm\.method"):
        build_config({"algorithm": {"method": "ppo"}}, use_env=False)
    with pytest.raises(ConfigError, match=r"launcher\.threads"):
        build_config({"launcher": {"threads": {"learner": 0}}}, use_env=False)
    with pytest.raises(ConfigError, match=r"launcher\.threads"):
        build_config({"launcher": {"threads": {"trainer": 2}}}, use_env=False)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="mini_batch_groups"):
        build_config({"learner": {"groups_per_step": 4, "mini_batch_groups": 8}}, use_env=False)
    with pytest.raises(ConfigError, match="data.path"):
        build_config({"data": {"source": "jsonl"}}, use_env=False)


def test_teacher_engine_vllm_only_for_methods_it_can_score():
    for method in ("rlrt", "rlsd", "rlrt_all", "grpo"):
        cfg = build_config({"algorithm": {"method": method}, "teacher": {"engine": "vllm"}}, use_env=False)
        assert cfg.teacher.engine == "vllm"
    for method, what in (("sdpo", "top-k ids"), ("srpo", "full-vocabulary entropy")):
        with pytest.raises(ConfigError, match=rf"teacher\.engine 'vllm' cannot score method '{method}'.*{what}"):
            build_config({"algorithm": {"method": method}, "teacher": {"engine": "vllm"}}, use_env=False)
    env = {"RLRT__TEACHER__ENGINE": "vllm", "RLRT__TEACHER__VLLM__ENFORCE_EAGER": "true"}
    cfg = build_config({}, environ=env)
    assert cfg.teacher.engine == "vllm" and cfg.teacher.vllm.enforce_eager is True
    with pytest.raises(ConfigError, match=r"teacher\.engine"):
        build_config({"teacher": {"engine": "tensorrt"}}, use_env=False)


def test_env_overrides_typed_and_validated():
    env = {"RLRT__LEARNER__LR": "5e-6", "RLRT__ALGORITHM__DECAY_STEPS": "30",
           "RLRT__ALGORITHM__NORM_BY_STD": "false", "REDIS_URL": "redis://:pw@127.0.0.1:6379/2"}
    cfg = build_config({"learner": {"lr": 1e-6}}, environ=env)
    assert cfg.learner.lr == 5e-6
    assert cfg.algorithm.decay_steps == 30
    assert cfg.algorithm.norm_by_std is False
    assert cfg.transport.redis_url == "redis://:pw@127.0.0.1:6379/2"
    with pytest.raises(ConfigError, match=r"learner\.lr"):
        build_config({}, environ={"RLRT__LEARNER__LR": "-1"})
    with pytest.raises(ConfigError, match=r"learner\.nope: unknown key"):
        build_config({}, environ={"RLRT__LEARNER__NOPE": "1"})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_paper_recipe_matches_table5():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper-qwen3-4b-base.yaml", use_env=False)
    assert cfg.algorithm.method == "rlrt"
    assert (cfg.algorithm.lam_init, cfg.algorithm.eps_w, cfg.algorithm.decay_steps) == (0.5, 1.0, None)
    assert (cfg.algorithm.eps_low, cfg.algorithm.eps_high, cfg.algorithm.is_cap) == (0.2, 0.28, 2.0)
    assert (cfg.learner.lr, cfg.learner.warmup_steps, cfg.learner.weight_decay, cfg.learner.grad_clip) == (1e-6, 10, 0.01, 1.0)
    assert (cfg.learner.groups_per_step, cfg.learner.mini_batch_groups, cfg.rollout.n_samples) == (256, 128, 8)
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.max_new_tokens == 20480
    assert cfg.rollout.engine == "vllm"


def test_sdpo_and_srpo_recipes_match_table5():
    root = Path(__file__).resolve().parents[1] / "configs"
    sdpo = load_config(root / "sdpo-qwen3-8b.yaml", use_env=False)
    a = sdpo.algorithm
    assert (a.method, a.distill_alpha, a.distill_topk, a.distill_add_tail, a.distill_is_clip) == ("sdpo", 0.5, 100, True, 2.0)
    assert sdpo.learner.lr == 1e-5 and a.std_normalised is False and a.teacher_context(sdpo.teacher) == "peer"
    assert (sdpo.learner.groups_per_step, sdpo.learner.mini_batch_groups, sdpo.rollout.n_samples) == (256, 128, 8)
    srpo = load_config(root / "srpo-qwen3-8b.yaml", use_env=False)
    assert (srpo.algorithm.method, srpo.algorithm.srpo_beta, srpo.learner.lr) == ("srpo", 0.5, 5e-6)
    assert srpo.algorithm.std_normalised is False
    tiny = load_config(root / "tiny.yaml", overrides={"algorithm": {"method": "sdpo"}}, use_env=False)
    assert tiny.algorithm.distill_topk == 8 and tiny.algorithm.teacher_context(tiny.teacher) == "peer"
