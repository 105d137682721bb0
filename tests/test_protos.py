"""Generated protobuf code is in sync with protos/, and every message round-trips."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from rlrt_core.proto import trajectory_pb2 as tpb
from rlrt_core.proto import weights_pb2 as wpb

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    written = _load_generator().generate(tmp_path)
    names = sorted(p.name for p in written)
    committed = sorted(p.name for p in (ROOT / "rlrt_core" / "proto").iterdir()
                       if p.is_file() and p.suffix in {".py", ".pyi"})
    assert names == committed, "rlrt_core/proto has stale or missing files: run scripts/gen_protos.py"
    for path in written:
        assert path.read_bytes() == (ROOT / "rlrt_core" / "proto" / path.name).read_bytes(), (
            f"{path.name} differs from protos/: run scripts/gen_protos.py")


def _full_group() -> tpb.RolloutGroup:
    g = tpb.RolloutGroup(group_id="g-1", run_id="run", version=7, engine="torch", worker_id="w0", min_version=6)
    g.problem.CopyFrom(tpb.Problem(id="p1", prompt="1+1?", answer="2", solution="1+1=2"))
    g.prompt_ids.extend([1, 2, 3, 49151])
    for i in range(3):
        c = g.completions.add(finish_reason="stop" if i else "length", text=f"answer {i}")
        c.token_ids.extend([5, 6, 7 + i])
        c.logprobs.extend([-0.5, -1.25, -2.0])
        g.verifier_results.add(reward=float(i % 2), extracted=str(i), reason=None if i else "no number",
                               timed_out=i == 2)
        s = g.teacher_scores.add(teacher_version=7, context_kind=tpb.CONTEXT_KIND_PEER, peer_index=1,
                                 position_kl_mean=0.25, position_kl_max=1.5)
        s.student_logprobs.extend([-0.5, -1.0, -2.0])
        s.teacher_logprobs.extend([-0.25, -1.0, -3.0])
        s.position_kl.extend([0.0, 0.25, 1.5])
        s.teacher_topk_ids.CopyFrom(tpb.Tensor(dtype="I32", shape=[3, 2], data=bytes(24)))
        s.teacher_topk_logprobs.CopyFrom(tpb.Tensor(dtype="F32", shape=[3, 2], data=bytes(24)))
    g.timestamps.CopyFrom(tpb.Timestamps(dispatched_at=1.5, generated_at=2.5, verified_at=3.5,
                                         scored_at=4.5, generation_s=0.75))
    return g


@pytest.mark.parametrize("msg", [
    tpb.Problem(id="p", prompt="q", answer="a"),
    tpb.Problem(id="p", prompt="q", answer="a", solution=""),
    tpb.PromptTask(group_id="g", run_id="r", problem=tpb.Problem(id="p", prompt="q", answer="a"),
                   n_samples=8, min_version=3, dispatched_at=12.5),
    tpb.Completion(token_ids=[1, 2], logprobs=[-0.5, -0.25], finish_reason="stop", text="hi"),
    tpb.VerifierResult(reward=1.0, extracted="4", reason="ok", timed_out=False),
    tpb.Tensor(dtype="BF16", shape=[2, 3], data=bytes(range(12))),
    _full_group(),
    wpb.VersionInfo(version=3, total_bytes=10, num_tensors=2, checksum="ab", available_versions=[2, 3]),
    wpb.StreamWeightsRequest(version=0, chunk_bytes=1024),
    wpb.WeightChunk(version=3, requested_version=-1, name="w", dtype="F32", shape=[2], offset=0,
                    tensor_bytes=8, data=bytes(8), tensor_index=0, num_tensors=1, final=False),
    wpb.WeightChunk(version=3, final=True, checksum="c" * 64),
    wpb.HealthResponse(serving=True, latest_version=3, uptime_s=1.0),
], ids=lambda m: type(m).__name__)
def test_round_trip(msg) -> None:
    data = msg.SerializeToString()
    back = type(msg).FromString(data)
    assert back == msg
    assert back.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True)


def test_optional_presence_survives() -> None:
    # proto3 `optional`: an empty solution is different from no solution (teacher falls back to peer).
    with_empty = tpb.Problem.FromString(tpb.Problem(id="p", solution="").SerializeToString())
    without = tpb.Problem.FromString(tpb.Problem(id="p").SerializeToString())
    assert with_empty.HasField("solution") and not without.HasField("solution")
    v = wpb.StreamWeightsRequest.FromString(wpb.StreamWeightsRequest(version=0).SerializeToString())
    assert v.HasField("version") and v.version == 0
    assert not wpb.StreamWeightsRequest().HasField("version")


def test_float_fields_are_float32() -> None:
    # Log-probs travel as packed float32: 4 bytes per token plus a small header.
    c = tpb.Completion(logprobs=[-1.0 / 3.0] * 1000)
    assert len(c.SerializeToString()) < 4 * 1000 + 8
    assert math.isclose(tpb.Completion.FromString(c.SerializeToString()).logprobs[0], -1 / 3, rel_tol=1e-7)


def test_service_descriptor() -> None:
    svc = wpb.DESCRIPTOR.services_by_name["WeightService"]
    assert {m.name for m in svc.methods} == {"GetLatestVersion", "StreamWeights", "Health"}
    assert svc.methods_by_name["StreamWeights"].server_streaming
