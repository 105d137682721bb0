"""The collective weight data plane into vLLM (`transport.weights_backend: collective`), tiny model,
fp32. Run by `make test-vllm` only (in .venv-vllm). The receiver runs inside vLLM's worker process
(worker-extension methods), joined to a real gloo group of a `CollectiveSender` in this process;
`WeightSync` loads a broadcast version through it: the worker's weights change to the published
ones, and generation matches the same weights loaded through the file path, tied lm_head included.
"""

from __future__ import annotations

import os
import uuid

import pytest
import redis
import torch

pytest.importorskip("vllm", reason="vLLM lives in .venv-vllm (make vllm-env / make test-vllm)")

from rlrt_core.config import RunConfig, build_config  # noqa: E402
from rlrt_core.engines import SamplingParams, make_engine  # noqa: E402
from rlrt_core.metrics import service_metrics  # noqa: E402
from rlrt_core.models import load_model  # noqa: E402
from rlrt_core.weights import WeightServer, announce_version  # noqa: E402
from rlrt_core.weights.collective import CollectivePublisher, CollectiveSender, announce_sender  # noqa: E402
from services.common.weight_sync import WeightSync  # noqa: E402

pytestmark = [pytest.mark.vllm]
TOKEN = "collective-vllm-token"
REDIS_URL_TEST = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/0")
PROMPTS = [[1, 9690, 198, 2683, 359], [7018, 411, 28, 5, 6]]
PROBE = "model.embed_tokens.weight"  # linear weights live in packed oneDNN handles on CPU


@pytest.fixture(scope="module")
def engine():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = build_config({"model": {"path": "tiny", "max_model_len": 128}, "rollout": {"engine": "vllm"}},
                       use_env=False)
    eng = make_engine(cfg)
    yield eng
    eng.close()


def _state(base: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    return {k: (v * scale if v.is_floating_point() and "norm" not in k else v.clone()) for k, v in base.items()}


def _greedy(engine) -> list[list[float]]:
    out = engine.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=6))
    return [r.completions[0].logprobs for r in out]


def test_broadcast_version_applied_inside_the_vllm_worker(engine):
    base = {k: v.clone() for k, v in load_model("tiny").state_dict().items()}
    client = redis.Redis.from_url(REDIS_URL_TEST)
    run = f"coll-vllm-{uuid.uuid4().hex[:8]}"
    cfg = RunConfig(run_name=run, transport={"weights_token": TOKEN, "weights_backend": "collective",
                                             "weights_collective_timeout_s": 30.0})
    server = WeightServer(token=TOKEN, keep_versions=3)
    server.start()
    sender = CollectiveSender(timeout_s=30.0)
    weights = CollectivePublisher(server, sender)
    m = service_metrics("rollout", run=run, worker="w")
    link = engine.collective_link()
    sync = WeightSync(cfg, client, engine.load_weights, version=engine.version, metrics=m, collective=link)
    try:
        announce_sender(client, run, address=sender.address(), backend=sender.backend)
        v0 = engine.version
        # The worker is not in a group before its first sync: version v0+1 comes over gRPC.
        weights.publish(v0 + 1, _state(base, 1.1))
        announce_version(client, run, v0 + 1, address=server.address)
        assert sync.sync() == v0 + 1
        # Usually over gRPC (the receiver joins during this sync, counted as a fallback), but on a
        # loaded box the sender may reach v0+1 after the receiver joined and broadcast it.
        before = m.weight_collective_versions._value.get()
        fell_back = sum(m.weight_collective_fallbacks.labels(reason=r)._value.get()
                        for r in ("no_sender", "not_member", "timeout", "broken", "checksum", "unverified", "apply"))
        assert before + fell_back == 1, (before, fell_back)
        # Now a member (its receiver runs inside the vLLM worker): the next version is broadcast.
        new = _state(base, 0.9)
        weights.publish(v0 + 2, new)
        announce_version(client, run, v0 + 2, address=server.address)
        assert sync.sync() == v0 + 2 and engine.version == v0 + 2
        assert m.weight_collective_versions._value.get() == before + 1  # v0+2 came by broadcast
        assert sender.versions_sent >= 1 and len(sender.members) == 1
        assert engine.weight_checksum(PROBE) == pytest.approx(float(new[PROBE].sum()), rel=1e-5, abs=1e-3)
        via_collective = _greedy(engine)
        # The same weights through the file path give the same log-probs (tied lm_head included).
        engine.load_weights(new, version=v0 + 3)
        via_file = _greedy(engine)
        for a, b in zip(via_collective, via_file):
            assert a == pytest.approx(b, abs=1e-5)
        engine.load_weights(base, version=v0 + 4)
        assert any(abs(x - y) > 1e-3 for a, b in zip(via_collective, _greedy(engine)) for x, y in zip(a, b))
    finally:
        sync.close()
        sender.close()
        server.stop(grace_s=0)
        for key in client.scan_iter(match=f"rlrt:{run}:*"):
            client.delete(key)
        client.close()
