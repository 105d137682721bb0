"""The streaming rollout worker as a real process (tiny model, real Redis, a real weight server):
a version announced while groups are in the engine is loaded between decode steps, the groups
in flight keep going and carry both versions per token, each group's version is its oldest
token's, and every task comes back exactly once. Run against every engine in $RLRT_TEST_ENGINES
(default "torch"; `make test-vllm` adds vLLM's stream)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from rlrt_core.config import dump_config, load_config
from rlrt_core.data import arithmetic_problems
from rlrt_core.models import load_model
from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.transport import codec
from rlrt_core.transport.streams import StreamBus
from rlrt_core.weights.announce import announce_version
from rlrt_core.weights.server import WeightServer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/0")
ENGINES = [e.strip() for e in os.environ.get("RLRT_TEST_ENGINES", "torch").split(",") if e.strip()]


@pytest.mark.parametrize("engine", ENGINES)
def test_streaming_worker_loads_new_weights_in_flight(tmp_path, engine):
    run = f"stream-{uuid.uuid4().hex[:8]}"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", use_env=False, overrides={
        "run_name": run, "metrics": {"run_dir": str(tmp_path)},
        "transport": {"redis_url": REDIS_URL, "weights_token": "tok", "weights_port": 0},
        "rollout": {"engine": engine, "streaming": True, "max_inflight_groups": 2, "n_samples": 4, "max_new_tokens": 64, "seed": 3}})
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    server = WeightServer(token="tok", port=0)
    server.start()
    bus = StreamBus.from_url(REDIS_URL, run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(tmp_path / "rollout.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "serve", "rollout", "--config",
                                 str(tmp_path / "config.yaml"), "--worker", "rollout-0"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        problems = arithmetic_problems(digits=1, ops=["+"], num_problems=12, seed=0, instruction=None)
        for i, p in enumerate(problems):
            bus.publish("prompts", codec.prompt_task(f"{run}-g{i}", run, p, n_samples=4, min_version=0))
        bus.ensure_group("rollouts", "test")
        got: dict[str, pb.RolloutGroup] = {}
        announced = False
        deadline = time.time() + 300
        while len(got) < len(problems) and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "rollout.log").read_text()[-3000:]
            for e, g in bus.consume_messages("rollouts", "test", "t", pb.RolloutGroup, count=16, block_ms=500,
                                             limits=codec.Limits(max_version=1)):
                got[g.group_id] = g
                bus.ack(e)
            if got and not announced:  # groups are streaming through: publish version 1 mid-stream
                state = load_model("tiny").state_dict()
                gen = torch.Generator().manual_seed(0)
                new = {k: v + torch.randn(v.shape, generator=gen) * 0.05 for k, v in state.items()}
                new["lm_head.weight"] = new["model.embed_tokens.weight"]
                server.publish(1, new)
                announce_version(bus.client, run, 1, address=server.address)
                announced = True
        assert sorted(got) == sorted(f"{run}-g{i}" for i in range(len(problems))), "a task came back missing"
        versions = {gid: [list(c.token_versions) for c in g.completions] for gid, g in got.items()}
        for gid, g in got.items():
            flat = [v for vs in versions[gid] for v in vs]
            assert all(len(vs) == len(c.token_ids) for vs, c in zip(versions[gid], g.completions))
            assert g.version == min(flat), gid  # admission and staleness see the oldest token
            assert all(vs == sorted(vs) for vs in versions[gid])
        kinds = {gid: {v for vs in versions[gid] for v in vs} for gid in got}
        crossed = [gid for gid, k in kinds.items() if k == {0, 1}]
        assert crossed, f"no group crossed the update: {kinds}"
        assert any(k == {1} for k in kinds.values()), "no group was generated entirely by version 1"
        # rows live at the update switched mid-sequence (all rows of a group start together)
        for gid in crossed:
            assert all(vs[0] == 0 for vs in versions[gid])
            assert any(vs[-1] == 1 for vs in versions[gid])
        ep = json.loads((tmp_path / "services" / "rollout-0.json").read_text())
        st = httpx.get(f"http://127.0.0.1:{ep['admin_port']}/status", timeout=10).json()
        assert st["version"] == 1 and st["streaming"] is True and st["counters"]["groups"] == len(problems)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        server.stop()
        bus.delete_run()
        bus.client.close()
