"""bench/methods.py: the held-out split, and one unattended run on the tiny model (train, checkpoint, eval)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlrt_core.config import load_config
from rlrt_core.data import arithmetic_problems

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import methods as bench_methods  # noqa: E402


def test_heldout_split_never_holds_a_training_problem():
    cfg = load_config(ROOT / "configs" / "methods-mini.yaml", use_env=False)
    held = bench_methods.heldout_split(cfg, 40, 1_000_003)
    a = cfg.data.arithmetic
    train = {p.prompt for p in arithmetic_problems(digits=a.digits, ops=a.ops, num_problems=a.num_problems,
                                                    seed=a.seed, instruction=None)}
    prompts = [r["prompt"] for r in held]
    assert len(prompts) == len(set(prompts)) == 40
    assert not set(prompts) & train
    for r in held:  # answers are the products the prompts ask for
        x, y = r["prompt"].removeprefix("What is ").removesuffix("?").split(" * ")
        assert int(r["answer"]) == int(x) * int(y)


def test_heldout_split_refuses_a_kind_the_training_set_exhausts():
    cfg = load_config(ROOT / "configs" / "demo.yaml", use_env=False)  # 5 000 draws of 100 single-digit sums
    with pytest.raises(SystemExit, match="held-out problems exist outside"):
        bench_methods.heldout_split(cfg, 10, 1_000_003)
    with pytest.raises(SystemExit, match="must differ from the training seed"):
        bench_methods.heldout_split(cfg, 10, cfg.data.arithmetic.seed)


def test_eval_names_a_run_dir_without_checkpoints(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"path": "tiny"}}))
    out = subprocess.run([sys.executable, "-m", "services.cli.main", "eval", "--model", str(tmp_path),
                          "--data", "arithmetic", "-k", "1", "--limit", "1"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2
    assert "has no checkpoints under" in " ".join((out.stdout + out.stderr).split())


@pytest.mark.slow
def test_tiny_run_trains_each_method_and_evaluates_its_checkpoint(tmp_path):
    recipe = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    recipe["data"]["arithmetic"].update(ops=["*"], num_problems=30)
    path = tmp_path / "tiny-mul.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out_dir = tmp_path / "out"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "methods.py"), "--recipe", str(path),
                          "--methods", "rlrt,grpo", "--seeds", "3", "--steps", "1", "--eval-problems", "4",
                          "-k", "2", "--out", str(out_dir)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((out_dir / "methods.json").read_text())
    assert doc["heldout_problems"] == 4 and doc["k"] == 2 and doc["steps"] == 1
    assert [(r["method"], r["seed"]) for r in doc["runs"]] == [("rlrt", 3), ("grpo", 3)]
    for rep in [doc["base"]] + [r["eval"] for r in doc["runs"]]:
        assert rep["num_problems"] == 4
        assert set(rep["pass_at_k"]) == {"1", "2"}
        assert sum(rep["outcomes"].values()) == 4 * 2  # every sample verified
    for r in doc["runs"]:
        assert len(r["reward_curve"]) == 1  # one learner step trained and recorded
        assert (out_dir / f"{r['method']}-s3" / "checkpoints" / "step_000001" / "model.safetensors").is_file()
    # the evaluated checkpoint is the trained model: its weights differ from the base's
    from safetensors.torch import load_file

    w = load_file(str(out_dir / "rlrt-s3" / "checkpoints" / "step_000001" / "model.safetensors"))
    from rlrt_core.models import load_model

    base = load_model("tiny").state_dict()
    assert any(not base[k].equal(v) for k, v in w.items() if k in base)
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| ")]
    assert [ln.split("|")[1].strip() for ln in rows[1:]] == ["base", "rlrt", "grpo"]
    assert (out_dir / "methods.png").stat().st_size > 1000
    # the wall time comes with what else used the box meanwhile
    assert doc["box"]["cores"] == os.cpu_count() and doc["box"]["foreign_cores"] >= 0
    assert doc["box"]["loadavg_max"] > 0  # sampled every second while the runs loaded the box
    assert "while other processes used" in out.stdout
