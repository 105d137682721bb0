"""Several learner ranks (rlrt_core.learner_ranks): the batch wire format, and `rlrt serve learner`
under torchrun with 2 gloo ranks on CPU end to end against the real Redis (the test plays the
rollout, verifier and teacher stages): ZeRO-2 and ZeRO-3 weights equal the one-rank step on the
same batches within 2e-5; kill -9 of rank 1, torchrun restarts the ranks, the run resumes from
its last checkpoint (every rank's optimizer shard) and finishes."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import torch
import yaml

from rlrt_core.learner import TrainGroup, TrainSample
from rlrt_core.learner_ranks import decode, encode

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/0")


def test_batch_wire_format_round_trips_exactly():
    """Token ids, float lists (float64: bit-exact), missing fields and support tensors survive."""
    rng = random.Random(1)
    samples = [TrainSample(prompt_ids=[1, 2, 3], response_ids=[7, 8], behavior_logprobs=[-0.1 / 3, rng.random()],
                           reward=1.0, student_logprobs=[-1e-300, -2.5], teacher_logprobs=[math.pi, -0.0],
                           support_ids=torch.tensor([[4, 5], [6, 7]]),
                           teacher_support_logprobs=torch.tensor([[-0.5, -1.5], [-0.25, -3.0]]),
                           teacher_entropy=[0.1, 0.2]),
               TrainSample(prompt_ids=[1], response_ids=[9], behavior_logprobs=[-2.0], reward=0.0)]
    groups = [TrainGroup(group_id="g-1", version=3, samples=samples), TrainGroup(group_id="g-2", version=0,
                                                                                 samples=samples[1:])]
    header, back = decode(encode({"cmd": "step", "x": 1}, groups))
    assert header == {"cmd": "step", "x": 1}
    assert [g.group_id for g in back] == ["g-1", "g-2"] and [g.version for g in back] == [3, 0]
    for a, b in zip([s for g in groups for s in g.samples], [s for g in back for s in g.samples]):
        for name in ("prompt_ids", "response_ids", "behavior_logprobs", "reward", "student_logprobs",
                     "teacher_logprobs", "teacher_entropy"):
            assert getattr(b, name) == getattr(a, name), name
        for name in ("support_ids", "teacher_support_logprobs"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or (torch.equal(x, y) and x.dtype == y.dtype), name
    header, back = decode(encode({"cmd": "stop"}))
    assert header == {"cmd": "stop"} and back == []


# -- the service under torchrun ----------------------------------------------------------

def _config(tmp_path: Path, stage: int, total_steps: int, checkpoint_every: int) -> tuple[Path, dict]:
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    run = f"ranks-{uuid.uuid4().hex[:8]}"
    data.update(run_name=run, metrics={"run_dir": str(tmp_path / "run")},
                transport={"redis_url": REDIS_URL, "weights_port": 0, "weights_host": "127.0.0.1",
                                                    "weights_token": "ranks-test-token"})
    data["rollout"]["n_samples"] = 4
    # 2 groups x 4 samples per mini-batch, micro-batches of 2: 4 micro-batches, 2 per rank.
    # adam_eps 1e-6: see test_deepspeed_learner._cfg (near-zero gradients under eps 1e-8 make the
    # 2e-5 comparison depend on the CPU's summation order).
    data["learner"].update(lr=1e-3, adam_eps=1e-6, warmup_steps=1, groups_per_step=2, mini_batch_groups=2,
                           micro_batch_size=2,
                           total_steps=total_steps, checkpoint_every=checkpoint_every, max_staleness=0,
                           dist_timeout_s=60, deepspeed={"zero_optimization": {"stage": stage}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


class Stages:
    """Plays rollout + verifier + teacher: every PromptTask becomes a scored group (random tokens,
    alternating rewards, teacher log-probs), generated with the task's min_version."""

    def __init__(self, cfg: dict) -> None:
        from rlrt_core.transport.streams import StreamBus

        self.bus = StreamBus(redis.Redis.from_url(REDIS_URL), cfg["run_name"])
        self.rng = random.Random(0)
        self.sent: dict = {}

    def serve(self) -> int:
        from rlrt_core.proto import trajectory_pb2 as pb

        try:
            pairs = self.bus.consume_messages("prompts", "rollout", "sim", pb.PromptTask, count=16, block_ms=200)
        except redis.ResponseError:  # consumer groups not created yet (the learner is starting)
            time.sleep(0.2)
            return 0
        for e, t in pairs:
            g = pb.RolloutGroup(group_id=t.group_id, run_id=t.run_id, problem=t.problem, version=t.min_version,
                                min_version=t.min_version, prompt_ids=[1, 2, 3])
            for k in range(t.n_samples):
                n = 2 + k
                toks = [self.rng.randrange(5, 100) for _ in range(n)]
                lps = [-self.rng.uniform(1.0, 3.0) for _ in range(n)]
                g.completions.add(token_ids=toks, logprobs=lps, finish_reason="length")
                g.verifier_results.add(reward=float(k % 2 == 0))
                g.teacher_scores.add(student_logprobs=lps, teacher_logprobs=[x - 0.4 for x in lps])
            self.sent[g.group_id] = g
            self.bus.ack(e, [("scored", g)])
        return len(pairs)

    def close(self) -> None:
        self.bus.delete_run()


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _rank_pid(torchrun_pid: int, rank: int) -> int | None:
    for pid in _children(torchrun_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _torchrun(config: Path, log_path: Path, *, max_restarts: int) -> subprocess.Popen:
    from services.launcher import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("RLRT__")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.5", "-m", "services.cli.main", "serve",
           "learner", "--config", str(config), "--worker", "learner-0"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _drive(proc: subprocess.Popen, stages: Stages, log_path: Path, timeout_s: float, until=None) -> None:
    deadline = time.time() + timeout_s
    while proc.poll() is None:
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the ranks did not finish in time:\n" + log_path.read_text()[-4000:])
        stages.serve()
        if until is not None and until():
            return


def _plain_replay(rows: list[dict], sent: dict) -> dict[str, torch.Tensor]:
    """The one-rank, no-DeepSpeed learner on the same batches, in the same order."""
    from rlrt_core.config import load_config
    from rlrt_core.learner import PolicyLearner, train_group
    from rlrt_core.models import load_model

    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides={"learner": {
        "lr": 1e-3, "adam_eps": 1e-6, "warmup_steps": 1, "groups_per_step": 2, "mini_batch_groups": 2,
        "micro_batch_size": 2}},
        use_env=False)
    torch.manual_seed(cfg.learner.seed)
    learner = PolicyLearner(load_model("tiny"), cfg.learner, cfg.algorithm, temperature=cfg.rollout.temperature)
    for r in rows:
        learner.step([train_group(sent[g]) for g in r["groups"]])
    return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_learner_service_equals_one_rank(tmp_path, stage):
    from safetensors.torch import load_file

    from rlrt_core.checkpoint import latest_checkpoint

    config, cfg = _config(tmp_path, stage, total_steps=2, checkpoint_every=1)
    stages = Stages(cfg)
    log_path = tmp_path / "torchrun.log"
    proc = _torchrun(config, log_path, max_restarts=0)
    try:
        _drive(proc, stages, log_path, timeout_s=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stages.close()
    text = log_path.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "rank 1: stop after 2 steps" in text, text[-4000:]
    run_dir = Path(cfg["metrics"]["run_dir"])
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and all(len(r["groups"]) == 2 for r in rows)
    ck = latest_checkpoint(run_dir / "checkpoints")
    assert ck.name == "step_000002"
    for r in range(2):  # every rank's optimizer shard, with its Adam moments
        shard = load_file(str(ck / f"zero_rank{r:03d}_of_002.safetensors"))
        assert float(shard["0.exp_avg_sq"].abs().max()) > 0
    got = load_file(str(ck / "model.safetensors"))
    want = _plain_replay(rows, stages.sent)
    from rlrt_core.models import load_model

    init = load_model("tiny").state_dict()
    assert max(float((got[k] - init[k]).abs().max()) for k in got) > 5e-4, "the steps moved the weights"
    for k, v in got.items():
        assert float((v - want[k]).abs().max()) < 2e-5, (k, float((v - want[k]).abs().max()))


@pytest.mark.slow
def test_kill_rank_1_then_resume_from_checkpoint(tmp_path):
    """ZeRO-3, checkpoint every step: kill -9 rank 1 after step 2; rank 0 fails its next
    collective and every rank exits non-zero (torchrun --max-restarts 0, as under Ray, whose
    actor restart starts torchrun again); a new torchrun resumes from the last checkpoint
    (weights, every rank's optimizer shard) and finishes with one metrics row per step."""
    config, cfg = _config(tmp_path, 3, total_steps=4, checkpoint_every=1)
    stages = Stages(cfg)
    run_dir = Path(cfg["metrics"]["run_dir"])
    first_log, second_log = tmp_path / "torchrun-1.log", tmp_path / "torchrun-2.log"
    proc = _torchrun(config, first_log, max_restarts=0)
    try:
        _drive(proc, stages, first_log, timeout_s=600,
               until=lambda: (run_dir / "checkpoints" / "step_000002").is_dir())
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None, "rank 1 not found among torchrun's children"
        os.kill(victim, signal.SIGKILL)
        _drive(proc, stages, first_log, timeout_s=300)
        # rank 0 fails its next collective, or torchrun's agent takes it down first: either way
        # no step after the checkpoint is committed and torchrun exits non-zero
        assert proc.returncode != 0, "losing a rank must fail the ranks"
        proc = _torchrun(config, second_log, max_restarts=0)
        _drive(proc, stages, second_log, timeout_s=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stages.close()
    text = second_log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "resumed from" in text and "rank 1: stop after" in text, text[-4000:]
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4], [r["step"] for r in rows]
    trained = [g for r in rows for g in r["groups"]]
    assert len(trained) == len(set(trained)) == 8


def test_several_ranks_need_deepspeed():
    """`ray.learner.world_size` > 1 without learner.deepspeed is refused at start-up, naming both;
    RankedLearner refuses a learner without DeepSpeed."""
    from rlrt_core.config import AlgorithmConfig, ConfigError, LearnerConfig, build_config
    from rlrt_core.learner import PolicyLearner
    from rlrt_core.learner_ranks import RankedLearner
    from rlrt_core.models import load_model

    with pytest.raises(ConfigError, match=r"ray\.learner\.world_size \(2\).*learner\.deepspeed"):
        build_config({"ray": {"learner": {"world_size": 2}}}, use_env=False)
    cfg = build_config({"ray": {"learner": {"world_size": 2, "num_gpus": 2}},
                        "learner": {"deepspeed": {"zero_optimization": {"stage": 2}}}}, use_env=False)
    assert cfg.ray.learner.world_size == 2
    with pytest.raises(ValueError, match="need learner.deepspeed"):
        RankedLearner(PolicyLearner(load_model("tiny"), LearnerConfig(), AlgorithmConfig()))
