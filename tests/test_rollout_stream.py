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
    # vLLM's engine core keeps decoding in its own process while the worker pulls a version, so
    # its groups must outlast a pull (~1-3 s here) for an update to land mid-sequence
    new_tokens = 192 if engine == "vllm" else 64
    cfg = load_config(ROOT / "configs" / "tiny.yaml", use_env=False, overrides={
        "run_name": run, "metrics": {"run_dir": str(tmp_path)},
        "transport": {"redis_url": REDIS_URL, "weights_token": "tok", "weights_port": 0},
        "rollout": {"engine": engine, "streaming": True, "max_inflight_groups": 2, "n_samples": 4, "max_new_tokens": new_tokens,
                    "seed": 3}})
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
        # enough tasks to outlast the updates: a row budget admits a new group whenever K rows are
        # free, so a short workload can be all in the engine before an update arrives
        problems = arithmetic_problems(digits=1, ops=["+"], num_problems=40, seed=0, instruction=None)
        for i, p in enumerate(problems):
            bus.publish("prompts", codec.prompt_task(f"{run}-g{i}", run, p, n_samples=4, min_version=0))
        bus.ensure_group("rollouts", "test")
        got: dict[str, pb.RolloutGroup] = {}
        base, version, max_version, got_at_announce = load_model("tiny").state_dict(), 0, 4, 0

        def crossed_any() -> bool:
            return any(len({v for c in g.completions for v in c.token_versions}) > 1 for g in got.values())

        deadline = time.time() + 300
        while len(got) < len(problems) and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "rollout.log").read_text()[-3000:]
            for e, g in bus.consume_messages("rollouts", "test", "t", pb.RolloutGroup, count=16, block_ms=500,
                                             limits=codec.Limits(max_version=max_version)):
                got[g.group_id] = g
                bus.ack(e)
            # Groups are streaming through: publish a version mid-stream. On a fast tiny model an
            # update can land just as the groups in flight end (seen with vLLM, whose stream hands a
            # group back one engine step after its last token): if four more groups came back and
            # none crossed, publish the next version.
            due = version == 0 or (len(got) >= got_at_announce + 4 and not crossed_any())
            if got and due and version < max_version and len(got) < len(problems):
                version += 1
                gen = torch.Generator().manual_seed(version)
                new = {k: v + torch.randn(v.shape, generator=gen) * 0.05 for k, v in base.items()}
                new["lm_head.weight"] = new["model.embed_tokens.weight"]
                server.publish(version, new)
                announce_version(bus.client, run, version, address=server.address)
                got_at_announce = len(got)
        assert sorted(got) == sorted(f"{run}-g{i}" for i in range(len(problems))), "a task came back missing"
        versions = {gid: [list(c.token_versions) for c in g.completions] for gid, g in got.items()}
        for gid, g in got.items():
            flat = [v for vs in versions[gid] for v in vs]
            assert all(len(vs) == len(c.token_ids) for vs, c in zip(versions[gid], g.completions))
            assert g.version == min(flat), gid  # admission and staleness see the oldest token
            assert all(vs == sorted(vs) for vs in versions[gid])
        kinds = {gid: {v for vs in versions[gid] for v in vs} for gid in got}
        crossed = [gid for gid, k in kinds.items() if len(k) == 2 and max(k) == min(k) + 1]
        assert crossed, f"no group crossed an update in {version} versions: {kinds}"
        assert any(k == {w} for k in kinds.values() for w in range(1, version + 1)), \
            "no group was generated entirely by a newer version"
        # rows live at the update switched mid-sequence (all rows of a group start together)
        for gid in crossed:
            old_v = min(kinds[gid])
            assert all(vs[0] == old_v for vs in versions[gid])
            assert any(vs[-1] == old_v + 1 for vs in versions[gid])
        ep = json.loads((tmp_path / "services" / "rollout-0.json").read_text())
        st = httpx.get(f"http://127.0.0.1:{ep['admin_port']}/status", timeout=10).json()
        assert st["version"] == version and st["streaming"] is True and st["counters"]["groups"] == len(problems)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        server.stop()
        bus.delete_run()
        bus.client.close()
