"""The teacher service with `teacher.engine: vllm` inside a real run (tiny recipe, every service a
process over the real Redis and gRPC): it scores through vLLM, loads each new weight version
and the learner trains on its D̄_t. Run by `make test-vllm` only (the services start with the
.venv-vllm interpreter running the test)."""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM lives in .venv-vllm (make vllm-env / make test-vllm)")

from rlrt_core.config import load_config  # noqa: E402
from rlrt_core.transport.streams import StreamBus  # noqa: E402
from services.launcher import LocalRun, read_metrics  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/0")


# The tiny random model never answers right, so no built-in method's teacher would score a
# group; this one scores every rollout of every group against the reference solution.
PLUGIN = """
from rlrt_core.methods import MethodSpec, register_method, rlrt_all_weight

register_method(MethodSpec("score_everything", rlrt_all_weight, teacher_scores="all", score_groups="all",
                           context="solution"))
"""


def test_run_with_the_vllm_teacher(tmp_path, monkeypatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "vteach_methods.py").write_text(PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "plugins"), str(ROOT)]))
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i),
                                        "solution": f"Adding {i} to {i} gives {2 * i}."}) + "\n" for i in range(20)))
    run_name = f"vteach-{uuid.uuid4().hex[:8]}"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", use_env=False, overrides={
        "run_name": run_name, "metrics": {"run_dir": str(tmp_path / run_name)},
        "transport": {"redis_url": REDIS_URL, "weights_port": 0},
        "data": {"source": "jsonl", "path": str(data), "format": "generic"},
        "algorithm": {"method": "score_everything", "plugins": ["vteach_methods"]},
        "teacher": {"engine": "vllm"},
        "learner": {"total_steps": 3, "max_staleness": 0, "checkpoint_every": 0}})
    run = LocalRun(cfg, n_rollout=1, restart_crashed=False)
    try:
        with run:
            rc = run.wait(timeout_s=540.0)
        teacher_log = (run.run_dir / "logs" / "teacher-0.log").read_text()
        assert rc == 0, (run.run_dir / "logs" / "learner-0.log").read_text()[-3000:] + teacher_log[-3000:]
    finally:
        bus = StreamBus.from_url(REDIS_URL, cfg.run_name)
        bus.delete_run()
        bus.client.close()
    rows = read_metrics(run.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "vllm" in teacher_log.lower()  # vLLM's engine start-up, not a torch model
    # synchronous: the teacher loaded versions 1 and 2 before scoring the groups of steps 2 and 3
    loaded = {int(v) for v in re.findall(r"loaded weight version (\d+)", teacher_log)}
    assert {1, 2} <= loaded, loaded
    # every group was scored (teacher.topk 8 in the tiny recipe, so D̄_t too) and trained on
    kls = [r.get("rlrt/position_kl_mean") for r in rows]
    assert all(k is not None and math.isfinite(k) and k >= 0 for k in kls), kls
