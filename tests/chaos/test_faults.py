"""Chaos suite: the real services as processes, a private Redis per test, faults injected at
deterministic points. Every test asserts that the run finishes (or fails loudly) within a
bound, and the accounting identity: each dispatched group trained exactly once, dropped as
stale, dead-lettered alone with a reason, or still in the pipeline (`check_accounting`).
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from chaos_helpers import (  # noqa: F401  (fixtures re-exported by conftest)
    check_accounting,
    chaos_cfg,
    failpoint_env,
    log_of,
    tail_logs,
    wait_for,
)
from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.transport.streams import StreamBus
from services.launcher import EXIT_WORKER_EXHAUSTED, LocalRun, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


def _announced(redis_client, cfg) -> int:
    return int(redis_client.hget(f"{cfg.transport.stream_prefix}:{cfg.run_name}:weights", "version"))


def test_redis_killed_between_training_and_announcement(tmp_path, private_redis):
    """Fault 1: Redis dies after a step trained and before its version is announced. The
    learner retries the announcement, notices the data loss, re-announces and re-dispatches;
    the run ends on its own with every group accounted for."""
    env, fp = failpoint_env(tmp_path, "learner.before_announce@3")
    cfg = chaos_cfg(tmp_path, private_redis.url)
    run = LocalRun(cfg, restart_crashed=True, extra_env=env)
    with run:
        wait_for(lambda: (fp / "learner.before_announce@3.hit").exists(), 600, "step 3 to be trained")
        private_redis.restart(after_s=3.0)  # kill -9, no persistence: everything is gone
        (fp / "learner.before_announce@3.release").touch()
        rc = run.wait(timeout_s=600)
    assert rc == 0, tail_logs(run.run_dir)
    state = check_accounting(cfg, run.run_dir)
    assert state["extra"]["totals"].get("redis_data_losses", 0) >= 1
    assert _announced(private_redis.client(), cfg) == state["version"]


def test_redis_paused_longer_than_the_block_timeout(tmp_path, private_redis):
    """SIGSTOP of Redis for longer than every socket timeout: calls time out and are retried;
    nothing is lost, nothing dead-lettered."""
    cfg = chaos_cfg(tmp_path, private_redis.url, learner={"total_steps": 5})
    run = LocalRun(cfg, restart_crashed=True)
    with run:
        wait_for(lambda: len(read_metrics(run.run_dir)) >= 2, 600, "two learner steps")
        private_redis.pause()
        time.sleep(15)  # > socket_timeout (block_ms/1000 + 10 s)
        private_redis.resume()
        rc = run.wait(timeout_s=600)
    assert rc == 0, tail_logs(run.run_dir)
    state = check_accounting(cfg, run.run_dir)
    assert state["extra"]["ledger"]["counts"]["dead"] == 0
    assert private_redis.client().xlen(f"rlrt:{cfg.run_name}:dead") == 0


def _valid_group(cfg, gid: str, *, tokens=(5, 6, 7), version: int = 0) -> pb.RolloutGroup:
    g = pb.RolloutGroup(group_id=gid, run_id=cfg.run_name, version=version, min_version=0, prompt_ids=[1, 2, 3])
    g.problem.id, g.problem.prompt, g.problem.answer = "p", "1+1", "2"
    for _ in range(2):
        g.completions.add(token_ids=list(tokens), logprobs=[-0.5] * len(tokens), finish_reason="length", text="2")
    return g


def _verified(g: pb.RolloutGroup, rewards=(1.0, 0.0)) -> pb.RolloutGroup:
    for r in rewards:
        g.verifier_results.add(reward=r)
    return g


def test_poison_entries_in_every_stream_are_dead_lettered_alone(tmp_path, private_redis):
    """Faults 2, 3, 7: one bad entry per kind in every stream of a live run is dead-lettered
    alone with its own reason; no valid group is harmed and the run finishes."""
    cfg = chaos_cfg(tmp_path, private_redis.url, learner={"total_steps": 6, "max_staleness": 2},
                    rollout={"version_wait_s": 4.0})
    poisons: dict[str, tuple[str, object, str]] = {}  # gid -> (stream, message, expected reason)

    t = pb.PromptTask(group_id="p-many", run_id=cfg.run_name, n_samples=5000, min_version=0)
    t.problem.prompt = "1+1"
    poisons["p-many"] = ("prompts", t, "n_samples=5000")
    t = pb.PromptTask(group_id="p-future", run_id=cfg.run_name, n_samples=2, min_version=10**12)
    t.problem.prompt = "1+1"
    poisons["p-future"] = ("prompts", t, "never announced")
    g = _valid_group(cfg, "r-nan")
    g.completions[1].logprobs[1] = float("nan")
    poisons["r-nan"] = ("rollouts", g, "non-finite")
    poisons["r-vocab"] = ("rollouts", _valid_group(cfg, "r-vocab", tokens=(5, 10**6)), "outside the vocabulary")
    poisons["v-long"] = ("verified", _verified(_valid_group(cfg, "v-long", tokens=tuple([5] * 2000))),
                         "exceed model.max_model_len")
    poisons["s-negative"] = ("scored", _verified(_valid_group(cfg, "s-negative", version=-7)), "< 0")
    poisons["s-future"] = ("scored", _verified(_valid_group(cfg, "s-future", version=10**9)), "ahead of the newest")
    g = _verified(_valid_group(cfg, "s-nan"))
    sc = g.teacher_scores.add(student_logprobs=[-1.0, -1.0, -1.0], teacher_logprobs=[-1.0, float("nan"), -1.0])
    g.teacher_scores.add()
    poisons["s-nan"] = ("scored", g, "non-finite")
    del sc

    run = LocalRun(cfg, restart_crashed=False)
    with run:
        wait_for(lambda: len(read_metrics(run.run_dir)) >= 1, 600, "a first learner step")
        bus = StreamBus.from_url(private_redis.url, cfg.run_name)
        for _gid, (stream, msg, _why) in poisons.items():
            bus.publish(stream, msg)
        rc = run.wait(timeout_s=600)
        # every poison ends up dead; the future task after version_wait_s
        wait_for(lambda: {d.gid for d in bus.dead_letters(100)} >= set(poisons), 60, "all poisons dead-lettered")
    assert rc == 0, tail_logs(run.run_dir)
    dead = {d.gid: d for d in bus.dead_letters(100)}
    assert set(dead) == set(poisons), sorted(dead)
    for gid, (stream, _msg, why) in poisons.items():
        assert why in dead[gid].reason, (gid, dead[gid].reason)
    state = check_accounting(cfg, run.run_dir)
    assert state["extra"]["ledger"]["counts"]["dead"] == 0  # no dispatched (valid) group was harmed


def test_worker_past_its_restart_budget_stops_the_run_loudly(tmp_path, private_redis):
    """Fault 5: a worker killed more often than `launcher.max_restarts` ends the run with a
    non-zero exit and a message naming it; `rlrt status` shows it down."""
    from services.progress import collect_status

    cfg = chaos_cfg(tmp_path, private_redis.url, learner={"total_steps": 200}, launcher={"max_restarts": 1})
    run = LocalRun(cfg, restart_crashed=True)
    with run:
        wait_for(lambda: len(read_metrics(run.run_dir)) >= 1, 600, "a first learner step")
        teacher = next(c for c in run.children if c.service == "teacher")
        teacher.signal(signal.SIGKILL)
        teacher.proc.wait(timeout=10)
        wait_for(lambda: (run.supervise_once(), teacher.restarts == 1 and teacher.alive())[1], 60, "the restart")
        teacher.signal(signal.SIGKILL)
        teacher.proc.wait(timeout=10)
        t0 = time.time()
        rc = run.wait(timeout_s=120)
        assert time.time() - t0 < 60
        snap = collect_status(run.run_dir)
    assert rc == EXIT_WORKER_EXHAUSTED
    assert "teacher-0" in run.failure and "max_restarts=1" in run.failure
    states = {s["worker"]: s["alive"] for s in snap["services"]}
    assert states["teacher-0"] is False and states["learner-0"] is True, states


def test_learner_killed_while_writing_a_checkpoint(tmp_path, private_redis):
    """Fault 6: kill -9 of the learner in the middle of a checkpoint write. The resumed learner
    starts from the previous checkpoint, drops the metrics rows it will re-train, re-dispatches
    the groups the dead process had acked (their updates were lost), and finishes."""
    env, fp = failpoint_env(tmp_path, "learner.checkpoint_write@4")
    cfg = chaos_cfg(tmp_path, private_redis.url, learner={"total_steps": 6, "checkpoint_every": 2})
    run = LocalRun(cfg, restart_crashed=True, extra_env=env)
    with run:
        wait_for(lambda: (fp / "learner.checkpoint_write@4.hit").exists(), 600, "the step-4 checkpoint write")
        learner = run.learner()
        learner.signal(signal.SIGKILL)
        learner.proc.wait(timeout=10)
        learner.close()
        learner.env = {k: v for k, v in learner.env.items() if not k.startswith("RLRT_FAILPOINT")}
        learner.start()
        rc = run.wait(timeout_s=600)
    assert rc == 0, tail_logs(run.run_dir)
    assert "resumed from" in log_of(run.run_dir, "learner-0") and "step 2" in log_of(run.run_dir, "learner-0")
    state = check_accounting(cfg, run.run_dir)
    assert state["extra"]["totals"].get("redispatched", 0) >= 1
    assert not list((run.run_dir / "checkpoints").glob(".step_*"))  # the torn write was cleaned up


def test_forty_steps_with_redis_killed_at_a_random_step(tmp_path, private_redis):
    """Done-when of the fault-tolerance issue: a 40-step tiny run, Redis (no persistence)
    killed at a random step and restarted 3 s later, finishes on its own, identity intact."""
    kill_at = random.Random().randint(4, 30)
    cfg = chaos_cfg(tmp_path, private_redis.url, learner={"total_steps": 40, "checkpoint_every": 10})
    run = LocalRun(cfg, restart_crashed=True)
    with run:
        wait_for(lambda: len(read_metrics(run.run_dir)) >= kill_at, 600, f"step {kill_at}")
        private_redis.restart(after_s=3.0)
        rc = run.wait(timeout_s=600)
    assert rc == 0, (kill_at, tail_logs(run.run_dir))
    state = check_accounting(cfg, run.run_dir)
    assert state["extra"]["totals"].get("redis_data_losses", 0) >= 1, kill_at
    assert _announced(private_redis.client(), cfg) == state["version"]
