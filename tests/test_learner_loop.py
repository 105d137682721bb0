"""`LearnerLoop` without Redis or gRPC: the in-memory bus (`rlrt_core.transport.memory`) and a
weight sink that records versions, with the real tiny model and `PolicyLearner`. The test
plays the middle stages itself (prompts -> scored) so every round is deterministic. The same
loop runs against the real Redis in tests/test_e2e.py and tests/chaos/."""

from __future__ import annotations

import random
import threading
import uuid
from pathlib import Path

import pytest

from rlrt_core.config import load_config
from rlrt_core.data import load_problems
from rlrt_core.learner import PolicyLearner
from rlrt_core.learner_loop import LearnerLoop, read_metrics_rows
from rlrt_core.models import load_model
from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.transport.memory import MemoryBus

ROOT = Path(__file__).resolve().parents[1]


class WeightSink:
    """Stands where the gRPC WeightServer stands: records what was published."""

    def __init__(self) -> None:
        self.versions: list[int] = []
        self.dtypes: list[str | None] = []

    def publish(self, version: int, state_dict, *, dtype: str | None = None) -> None:
        assert state_dict and all(v.device.type == "cpu" for v in state_dict.values())
        self.versions.append(version)
        self.dtypes.append(dtype)


def _cfg(tmp_path, **learner):
    over = {"run_name": f"loop-{uuid.uuid4().hex[:6]}", "metrics": {"run_dir": str(tmp_path / "run")},
            "rollout": {"n_samples": 2},
            "learner": {"total_steps": 4, "groups_per_step": 2, "mini_batch_groups": 2, "checkpoint_every": 2,
                        "max_staleness": 1, **learner}}
    return load_config(ROOT / "configs" / "tiny.yaml", overrides=over, use_env=False)


class Harness:
    def __init__(self, cfg, bus: MemoryBus | None = None) -> None:
        self.cfg = cfg
        self.bus = bus or MemoryBus(cfg.run_name)
        self.model = load_model("tiny")
        self.vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.sink = WeightSink()
        self.announced: list[int] = []
        self.loop = LearnerLoop(cfg, PolicyLearner(self.model, cfg.learner, cfg.algorithm), load_problems(cfg.data),
                                bus=self.bus, weights=self.sink, announce=self.announced.append,
                                read_announced=lambda: self.announced[-1] if self.announced else None,
                                worker="learner-0", vocab_size=self.vocab)
        self.rng = random.Random(0)

    def group_for(self, task: pb.PromptTask, version: int) -> pb.RolloutGroup:
        """What rollout + verifier + teacher would make of `task` (random tokens, alternating rewards)."""
        g = pb.RolloutGroup(group_id=task.group_id, run_id=task.run_id, problem=task.problem, version=version,
                            min_version=task.min_version, prompt_ids=[1, 2, 3])
        for k in range(task.n_samples):
            toks = [self.rng.randrange(5, 100) for _ in range(4)]
            g.completions.add(token_ids=toks, logprobs=[-2.0] * 4, finish_reason="length")
            g.verifier_results.add(reward=float(k % 2 == 0))
            g.teacher_scores.add(student_logprobs=[-2.0] * 4, teacher_logprobs=[-2.5] * 4)
        return g

    def stages(self, limit: int = 1000, *, version=None, mutate=None) -> int:
        """Turn up to `limit` prompts into scored groups, generated with `version` (default:
        the task's min_version, the oldest weights a worker may use)."""
        pairs = self.bus.consume_messages("prompts", "rollout", "sim", pb.PromptTask, count=limit, block_ms=0)
        for e, t in pairs:
            g = self.group_for(t, t.min_version if version is None else version)
            if mutate is not None:
                mutate(g)
            self.bus.ack(e, [("scored", g)])
        return len(pairs)

    def run(self, max_rounds: int = 200, **stage_kw) -> None:
        for _ in range(max_rounds):
            if self.loop.done:
                return
            self.loop.round()
            self.stages(**stage_kw)
        raise AssertionError(f"not done after {max_rounds} rounds: {self.loop.status()}")

    def rows(self):
        return read_metrics_rows(self.loop.metrics_path)

    def check_identity(self):
        c = self.loop.ledger.counts
        assert c["dispatched"] == c["trained"] + c["dropped_stale"] + c["dead"] + len(self.loop.ledger.outstanding), c
        trained = [g for r in self.rows() for g in r["groups"]]
        assert len(trained) == len(set(trained)) == c["trained"]


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_staleness_accounting(tmp_path, max_staleness):
    h = Harness(_cfg(tmp_path, max_staleness=max_staleness, total_steps=5))
    h.loop.start()
    h.run()
    rows = h.rows()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and [r["version"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["staleness/max"] <= max_staleness for r in rows)
    if max_staleness == 0:
        assert all(r["staleness/max"] == 0 for r in rows)
    else:  # workers used the oldest allowed weights: some groups really were stale
        assert max(r["staleness/max"] for r in rows) >= 1
    assert h.sink.versions == [0, 1, 2, 3, 4, 5] and h.announced == [0, 1, 2, 3, 4, 5]
    assert set(h.sink.dtypes) == {"float32"}  # tiny recipe: torch engine, model.dtype float32
    h.check_identity()


def test_stale_groups_are_dropped_and_counted(tmp_path):
    h = Harness(_cfg(tmp_path, max_staleness=0, total_steps=3))
    h.loop.start()
    h.loop.round()
    h.stages()
    h.loop.round()  # step 1 trained at version 0
    assert h.loop.step == 1
    # a straggler generated by version 0 arrives at version 1: lag 1 > 0, dropped
    task = pb.PromptTask(group_id="late", run_id=h.cfg.run_name, n_samples=2, min_version=0)
    task.problem.prompt = "1+1"
    h.bus.publish("scored", h.group_for(task, 0))
    h.run()
    assert h.loop.totals["dropped_stale"] >= 1 and h.loop.ledger.counts["adopted"] >= 1
    h.check_identity()


def test_duplicates_are_acked_not_trained(tmp_path):
    h = Harness(_cfg(tmp_path, total_steps=3))
    h.loop.start()
    copies = []
    h.loop.round()
    h.stages(mutate=lambda g: copies.append(pb.RolloutGroup.FromString(g.SerializeToString())))
    h.loop.round()
    for g in copies:  # the producer published every group twice
        h.bus.publish("scored", g)
    h.run()
    assert h.loop.totals["duplicates"] == len(copies)
    h.check_identity()


def test_a_malformed_group_is_dead_lettered_and_accounted_for(tmp_path):
    h = Harness(_cfg(tmp_path, total_steps=3))
    h.loop.start()
    h.loop.round()
    bad = {}

    def poison(g):
        if not bad:
            g.completions[0].logprobs[0] = float("nan")
            bad["gid"] = g.group_id

    h.stages(mutate=poison)
    h.run()
    [d] = h.bus.dead_letters()
    assert d.gid == bad["gid"] and "non-finite" in d.reason
    assert h.loop.ledger.counts["dead"] == 1
    h.check_identity()


def test_resume_redispatches_what_the_dead_learner_acked_after_its_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, total_steps=5, checkpoint_every=2)
    h = Harness(cfg)
    h.loop.start()
    while h.loop.step < 3:  # steps 1-3; checkpoint at 2; step 3's groups acked, then "crash"
        h.loop.round()
        h.stages()
    assert [r["step"] for r in h.rows()] == [1, 2, 3]
    h2 = Harness(cfg, bus=h.bus)
    h2.announced = h.announced  # the same Redis
    h2.loop._read_announced = lambda: h2.announced[-1] if h2.announced else None
    h2.loop.start()
    assert h2.loop.step == 2 and h2.loop.version == 4  # version 3 was announced after the checkpoint
    assert [r["step"] for r in h2.rows()] == [1, 2]  # step 3's row is re-trained, not duplicated
    h2.run()
    assert h2.loop.totals["redispatched"] >= cfg.learner.groups_per_step
    assert [r["step"] for r in h2.rows()] == [1, 2, 3, 4, 5]
    h2.check_identity()


def test_recovers_from_a_bus_that_lost_everything(tmp_path):
    h = Harness(_cfg(tmp_path, total_steps=4))
    h.loop.start()
    h.loop.round()
    h.stages()
    h.loop.round()
    h.loop.round()  # groups dispatched for the next step are in flight
    h.bus.lose_everything()
    h.run()
    assert h.loop.totals["redis_data_losses"] == 1 and h.loop.totals["redispatched"] >= 1
    assert h.announced[-1] == h.loop.version
    h.check_identity()


def test_commit_retries_until_the_bus_is_back(tmp_path):
    h = Harness(_cfg(tmp_path, total_steps=2))
    h.loop.start()
    h.loop.round()
    h.stages()
    real_ack_many = h.bus.ack_many
    fails = {"n": 2}

    def flaky(*a, **kw):
        if fails["n"]:
            fails["n"] -= 1
            raise ConnectionError("down")
        return real_ack_many(*a, **kw)

    h.bus.ack_many = flaky
    h.loop.round()  # trains; the ack fails twice, then lands
    assert h.loop.step == 1 and fails["n"] == 0 and h.announced[-1] == 1
    h.run()
    h.check_identity()


def test_pause_resume_and_staleness_changes_from_another_thread(tmp_path):
    h = Harness(_cfg(tmp_path, total_steps=3, max_staleness=1))
    h.loop.start()
    t = threading.Thread(target=lambda: h.loop.pause(True))
    t.start()
    t.join()
    h.loop.round()
    assert h.loop.ledger.counts["dispatched"] == 0 and h.loop.status()["paused"] is True
    errors = []

    def change():
        h.loop.set_max_staleness(2)
        try:
            h.loop.set_max_staleness(10**6)  # (s + 1) x groups_per_step > stream_maxlen
        except ValueError as err:
            errors.append(str(err))
        h.loop.pause(False)

    t = threading.Thread(target=change)
    t.start()
    t.join()
    assert h.loop.admission.max_staleness == 2 and "stream_maxlen" in errors[0]
    h.loop.round()
    assert h.loop.ledger.counts["dispatched"] == (2 + 1) * 2
    h.run()
    h.check_identity()
