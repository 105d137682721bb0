"""Every registered method, and a method defined in a plugin module outside the package,
runs through the whole pipeline (`rlrt demo --tiny --method M`, real processes, an embedded
Redis per run) and writes its own loss terms to metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""A user's method, outside rlrt: RLRT's weight at half strength."""
import torch
from rlrt_core.methods import register_method


@register_method("half_rlrt")
def half_rlrt(advantages, rewards, student, teacher):
    return torch.exp(0.5 * torch.sign(advantages)[:, None] * (student - teacher)), rewards >= 1.0
'''

# loss terms each method's loss writes (besides loss/loss)
TERMS = {"grpo": ["loss/pg_loss"], "rlsd": ["loss/pg_loss"], "rlrt": ["loss/pg_loss"], "rlrt_all": ["loss/pg_loss"],
         "grpo_eb": ["loss/pg_loss", "loss/entropy"], "sdpo": ["loss/distill"], "srpo": ["loss/pg_loss", "loss/distill"],
         "half_rlrt": ["loss/pg_loss"]}


def _demo(tmp_path: Path, method: str, *extra: str) -> list[dict]:
    run_dir = tmp_path / method
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("RLRT__")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "plugins"), str(ROOT)])
    p = subprocess.run([sys.executable, "-m", "services.cli.main", "demo", "--tiny", "--method", method, "--steps", "2",
                        "--run-dir", str(run_dir), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["grpo", "rlsd", "rlrt", "rlrt_all", "grpo_eb", "sdpo", "srpo", "half_rlrt"])
def test_demo_runs_every_method(tmp_path, method):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "user_methods.py").write_text(PLUGIN)
    extra = ("--plugin", "user_methods") if method == "half_rlrt" else ()
    rows = _demo(tmp_path, method, *extra)
    assert [r["step"] for r in rows] == [1, 2] and all(r["method"] == method for r in rows)
    for r in rows:
        # The tiny random model never answers right, so SDPO/SRPO may find no group with a
        # success (no distillation target): then no token gets their loss, and the row says so.
        if r["loss/target_tokens"] > 0:
            for key in ["loss/loss", *TERMS[method]]:
                assert key in r, (key, sorted(r))
    if method not in ("sdpo", "srpo"):
        assert all(r["loss/target_tokens"] > 0 for r in rows)


def test_sdpo_distils_on_smollm2_groups_with_a_success(tmp_path):
    """On SmolLM2 (base success ~0.2 on single-digit sums) groups with a success appear, the
    teacher ships the student's top-k support with its log-probs, and the learner trains the
    distillation loss on them."""
    run_dir = tmp_path / "sdpo"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("RLRT__")}
    env.update({"RLRT__MODEL__PATH": "smollm2-135m-instruct", "RLRT__LEARNER__GROUPS_PER_STEP": "4",
                "RLRT__ROLLOUT__MAX_NEW_TOKENS": "8", "RLRT__ALGORITHM__DISTILL_TOPK": "16"})
    p = subprocess.run([sys.executable, "-m", "services.cli.main", "demo", "--tiny", "--method", "sdpo", "--steps", "3",
                        "--run-dir", str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["loss/target_tokens"] > 0]
    assert trained, [r["reward/mean"] for r in rows]
    for r in trained:
        assert r["loss/distill"] >= 0 and r["loss/distill_is_ratio_mean"] > 0
