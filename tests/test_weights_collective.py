"""The collective weight data plane (rlrt_core/weights/collective.py) with real gloo process
groups: a sender in this process, members in their own processes (tests/collective_member.py);
versions arrive byte-identical and sha256-checked, a member killed with SIGKILL makes the
sender drop the epoch and re-form the group while the survivor keeps receiving, corrupted
bytes are refused; and `WeightSync` loads broadcast versions, verified against the gRPC
server's checksum, falling back to gRPC (counted) whenever the collective cannot deliver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import torch

from rlrt_core.config import RunConfig
from rlrt_core.metrics import service_metrics
from rlrt_core.weights import WeightServer, announce_version
from rlrt_core.weights.collective import (
    CollectivePublisher,
    CollectiveReceiver,
    CollectiveSender,
    announce_sender,
    buffer_checksum,
    read_sender,
    resolve_backend,
    safetensors_layout,
)
from services.common.weight_sync import WeightSync

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "collective-test-token"
REDIS_URL_TEST = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/0")
TIMEOUT_S = 4.0


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(300, 16, generator=g), "layer.weight": torch.randn(16, 16, generator=g),
            "steps": torch.tensor([seed], dtype=torch.int64)}


def value(metric, **labels) -> float:
    m = metric.labels(**labels) if labels else metric
    return m._value.get()


def hist_count(h) -> float:
    return sum(s.value for s in h.collect()[0].samples if s.name.endswith("_count"))


class Member:
    """A receiver process; `events()` reads what it reported."""

    def __init__(self, tmp: Path, address: str, name: str) -> None:
        self.out, self.stop = tmp / f"{name}.jsonl", tmp / f"{name}.stop"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "collective_member.py"), address,
                                      str(self.out), str(self.stop), str(TIMEOUT_S)], env=env)

    def events(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def versions(self) -> dict[int, dict]:
        return {e["version"]: e for e in self.events() if "version" in e}

    def failed(self) -> dict[int, str]:
        return {e["failed"]: e["reason"] for e in self.events() if "failed" in e}

    @property
    def member_id(self) -> int:
        ids = [e["member_id"] for e in self.events() if "member_id" in e]
        return ids[-1] if ids else 0

    def close(self) -> None:
        self.stop.write_text("")
        try:
            self.proc.wait(timeout=TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_until(pred, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def plane(tmp_path):
    server = WeightServer(token=TOKEN, keep_versions=3)
    server.start()
    m = service_metrics("learner", run="r", worker="w")
    sender = CollectiveSender(timeout_s=TIMEOUT_S, chunk_bytes=4096, metrics=m)  # several chunks per version
    members: list[Member] = []

    def spawn(n: int) -> list[Member]:
        new = [Member(tmp_path, sender.address(), f"m{len(members) + i}") for i in range(n)]
        members.extend(new)
        wait_until(lambda: all(x.member_id for x in new), what="members to register")
        return new

    yield server, sender, m, spawn
    for x in members:
        x.close()
    sender.close()
    server.stop(grace_s=0)


def send(server: WeightServer, sender: CollectiveSender, v: int) -> None:
    server.publish(v, state(v))
    sender.offer_from_server(server, v)
    assert sender.idle(60)


def test_versions_reach_every_member_byte_identical(plane):
    server, sender, m, spawn = plane
    a, b = spawn(2)
    for v in range(1, 5):
        send(server, sender, v)
        wait_until(lambda: v in a.versions() and v in b.versions(), what=f"version {v} at both members")
        want = server.checksum(v)
        buf, _, release = server.hold(v)
        try:
            import hashlib

            raw = hashlib.sha256(buf).hexdigest()
        finally:
            release()
        for x in (a, b):
            got = x.versions()[v]
            assert got["checksum"] == want and got["recomputed"] == want  # the server's version checksum
            assert got["bytes_sha256"] == raw  # and the buffer itself, byte for byte
    assert sender.versions_sent == 4 and sender.failures == 0 and sorted(sender.members) == sorted(
        [a.member_id, b.member_id])
    total = 4 * len(buf)
    assert sender.bytes_sent == total and value(m.collective_sent_bytes) == total
    assert value(m.collective_members) == 2
    assert hist_count(m.collective_broadcast_seconds) == 4
    assert sender.epoch == 1  # same members throughout: one group


@pytest.mark.slow  # ~25 s each: the lost member's heartbeat has to go stale
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_lost_member_regroups_and_survivor_keeps_receiving(plane, sig):
    server, sender, m, spawn = plane
    a, b = spawn(2)
    send(server, sender, 1)
    wait_until(lambda: 1 in a.versions() and 1 in b.versions(), what="version 1 at both")
    b.proc.send_signal(sig)
    if sig == signal.SIGKILL:
        b.proc.wait()
    epoch = sender.epoch
    # The next broadcast fails on the dead peer (a frozen one: it times out after TIMEOUT_S), or
    # its epoch does not form; the sender drops the epoch, waits out the lost member's heartbeat
    # and forms a group of the survivor. A survivor still inside the failed receive (up to
    # TIMEOUT_S) misses the next rendezvous and is left out until its heartbeat moves again, so
    # versions are spaced as in a run (seconds apart), not sent back to back.
    deadline = time.monotonic() + 8 * TIMEOUT_S
    v = 1
    while True:
        v += 1
        send(server, sender, v)
        if sender.members == [a.member_id]:  # the broadcast of v succeeded (a failure empties it)
            wait_until(lambda: v in a.versions(), timeout_s=2 * TIMEOUT_S, what=f"version {v} at the survivor")
            break
        assert time.monotonic() < deadline, f"no group of the survivor by version {v} (epoch {sender.epoch})"
        time.sleep(0.25)
    assert sender.failures >= 1 and value(m.collective_failures) == sender.failures
    assert sender.epoch > epoch and sender.members == [a.member_id]
    assert value(m.collective_members) == 1
    last = v
    for v in (last + 1, last + 2):  # and the survivor keeps receiving every version
        send(server, sender, v)
        wait_until(lambda: v in a.versions(), what=f"version {v} at the survivor")
        assert a.versions()[v]["recomputed"] == server.checksum(v)
    if sig == signal.SIGSTOP:
        b.proc.kill()
        b.proc.wait()


def test_corrupt_bytes_are_refused_then_next_version_arrives(plane):
    server, sender, m, spawn = plane
    (a,) = spawn(1)
    server.publish(1, state(1))
    buf, checksum, release = server.hold(1)
    bad = bytearray(buf)
    release()
    bad[-3] ^= 0xFF  # one flipped byte in the last tensor, as a broken link would deliver it
    sender.offer(1, bad, server.checksum(1))
    assert sender.idle(60)
    wait_until(lambda: 1 in a.failed(), what="version 1 refused")
    assert a.failed()[1] == "checksum" and 1 not in a.versions()
    send(server, sender, 2)
    wait_until(lambda: 2 in a.versions(), what="version 2")
    assert a.versions()[2]["recomputed"] == server.checksum(2)


def test_layout_and_checksum_of_the_server_buffer():
    server = WeightServer(token=TOKEN)
    server.publish(3, state(3), dtype="bfloat16")
    buf, checksum, release = server.hold(3)
    try:
        layout = safetensors_layout(buf)
        assert [(n, d, s) for n, d, s, _, _ in layout] == [("embed.weight", "BF16", (300, 16)),
                                                           ("layer.weight", "BF16", (16, 16)), ("steps", "I64", (1,))]
        assert buffer_checksum(buf) == checksum() == server.checksum(3)
        with pytest.raises(ValueError):
            safetensors_layout(buf[:20])
    finally:
        release()
    assert resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    with pytest.raises(ValueError):
        resolve_backend("mpi")
    if not torch.cuda.is_available():  # refused before a CPU-only process could join (and stall) an NCCL group
        with pytest.raises(ValueError, match="CUDA"):
            resolve_backend("nccl")
        with pytest.raises(ValueError, match="CUDA"):
            CollectiveReceiver("127.0.0.1:1", backend="nccl")


def test_config_keys_validated():
    from pydantic import ValidationError

    t = RunConfig(transport={"weights_backend": "collective"}).transport
    assert (t.weights_backend, t.weights_collective_backend, t.weights_collective_timeout_s) == (
        "collective", "auto", 60.0)
    assert RunConfig().transport.weights_backend == "grpc"
    for bad in ({"weights_backend": "nccl"}, {"weights_collective_backend": "mpi"},
                {"weights_collective_timeout_s": 0}):
        with pytest.raises(ValidationError):
            RunConfig(transport=bad)


# -- WeightSync over the collective ------------------------------------------------------------------

@pytest.fixture
def rrun():
    client = redis.Redis.from_url(REDIS_URL_TEST)
    run = f"coll-{uuid.uuid4().hex[:8]}"
    yield client, run
    keys = list(client.scan_iter(match=f"rlrt:{run}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_weight_sync_loads_broadcast_versions_and_falls_back_counted(rrun):
    client, run = rrun
    cfg = RunConfig(run_name=run, transport={"weights_token": TOKEN, "weights_backend": "collective",
                                             "weights_collective_timeout_s": TIMEOUT_S})
    server = WeightServer(token=TOKEN, keep_versions=3)
    server.start()
    sender = CollectiveSender(timeout_s=TIMEOUT_S, chunk_bytes=4096)
    weights = CollectivePublisher(server, sender)
    loaded: dict[int, dict[str, torch.Tensor]] = {}

    def load(pairs, version):
        loaded[version] = {n: t.clone() for n, t in pairs}

    m = service_metrics("rollout", run=run, worker="w")
    sync = WeightSync(cfg, client, load, version=-1, metrics=m)

    def publish(v: int, corrupt: bool = False) -> None:
        if corrupt:  # the server holds v; the broadcast carries damaged bytes
            server.publish(v, state(v))
            buf, _, release = server.hold(v)
            bad = bytearray(buf)
            release()
            bad[-1] ^= 0x01
            sender.offer(v, bad, server.checksum(v))
        else:
            weights.publish(v, state(v))
        announce_sender(client, run, address=sender.address(), backend=sender.backend)
        announce_version(client, run, v, address=server.address)

    def fallbacks(reason: str) -> float:
        return value(m.weight_collective_fallbacks, reason=reason)

    try:
        # No sender announced yet: gRPC.
        server.publish(0, state(0))
        announce_version(client, run, 0, address=server.address)
        assert sync.sync() == 0 and fallbacks("no_sender") == 1
        # Announced, but this worker is not in a group yet (it joins now): gRPC again.
        publish(1)
        assert sync.sync() == 1 and fallbacks("not_member") == 1
        wait_until(lambda: sync._link.status().member_id > 0, what="the receiver to register")
        for v in (2, 3):  # the sender forms a group with it: the versions arrive by broadcast
            publish(v)
            assert sync.sync() == v
        assert value(m.weight_collective_versions) == 2
        for v, tensors in loaded.items():
            for name, t in state(v).items():
                assert torch.equal(tensors[name], t), (v, name)
        got = value(m.weight_collective_versions)
        # Damaged bytes: refused by the receiver's sha256, loaded over gRPC, counted.
        publish(4, corrupt=True)
        assert sync.sync() == 4 and fallbacks("checksum") == 1
        assert all(torch.equal(loaded[4][n], t) for n, t in state(4).items())
        pulls = sum(value(m.weight_pulls, kind=k) for k in ("full", "delta", "fallback"))
        assert pulls == 3 and value(m.weight_pulls, kind="full") >= 2  # 0, 1 (delta from 0), 4 over gRPC
        publish(5)
        assert sync.sync() == 5 and value(m.weight_collective_versions) == got + 1
        assert all(torch.equal(loaded[5][n], t) for n, t in state(5).items())
        # Bytes consistent with their own header but not what the weight server serves as 6 (a
        # stale or foreign sender): the receiver stages them, the control plane's checksum refuses.
        server.publish(6, state(6))
        other = WeightServer(token=TOKEN)
        other.publish(6, state(60))
        buf, checksum, release = other.hold(6)
        sender.offer(6, bytearray(buf), checksum())
        release()
        announce_sender(client, run, address=sender.address(), backend=sender.backend)
        announce_version(client, run, 6, address=server.address)
        assert sync.sync() == 6 and fallbacks("checksum") == 2
        assert all(torch.equal(loaded[6][n], t) for n, t in state(6).items())
        assert value(m.weight_collective_versions) == got + 1
        info = sync._client_for(server.address).version_info(6)
        assert info.version == 6 and info.checksum == server.checksum(6)
        assert sync._client_for(server.address).version_info(1).version == -1  # no longer kept
        assert read_sender(client, run).address == sender.address()
    finally:
        sync.close()
        sender.close()
        server.stop(grace_s=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_learner_refuses_nccl_without_cuda_at_start_up(tmp_path, rrun):
    """`weights_collective_backend: nccl` on a learner without a GPU: exit 2 naming the key,
    before the model is loaded."""
    _client, run = rrun
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_name: {run}\nmodel:\n  path: tiny\nmetrics:\n  run_dir: {tmp_path / 'run'}\n"
                      f"transport:\n  redis_url: {REDIS_URL_TEST}\n  weights_token: t\n  weights_port: 0\n"
                      "  weights_backend: collective\n  weights_collective_backend: nccl\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "services.cli.main", "serve", "learner", "--config", str(recipe)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "weights_collective_backend nccl" in res.stderr + res.stdout and "CUDA" in res.stderr + res.stdout


def test_group_that_cannot_rendezvous_backs_off(plane):
    """A member that registers and acks but never reaches the process group (as behind a
    firewall): the epoch fails after timeout_s, and the next versions are not held up by new
    attempts (members are told at once to use gRPC) until the pause has passed."""
    import datetime
    import threading

    from torch.distributed import TCPStore

    server, sender, m, _spawn = plane
    host, port = sender.address().rsplit(":", 1)
    store = TCPStore(host, int(port), None, False, datetime.timedelta(seconds=10))
    mid = int(store.add("members", 1))
    store.add(f"m/{mid}/hb", 1)
    stop = threading.Event()

    def acker() -> None:  # heartbeats and acks every epoch it is listed in, joins no group
        while not stop.is_set():
            store.add(f"m/{mid}/hb", 1)
            if store.check(["epoch"]):
                e = store.get("epoch").decode()
                if str(mid) in store.get(f"e/{e}/members").decode():
                    store.set(f"e/{e}/ack/{mid}", "1")
            time.sleep(0.05)

    t = threading.Thread(target=acker, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        send(server, sender, 1)
        assert sender.failures == 1 and sender.members == [] and time.monotonic() - t0 >= TIMEOUT_S * 0.9
        t0 = time.monotonic()
        send(server, sender, 2)  # within the pause: no new attempt
        assert time.monotonic() - t0 < TIMEOUT_S / 2 and sender.failures == 1
        assert json.loads(store.get("latest")) == {"version": 2, "members": []}
        assert value(m.collective_failures) == 1
    finally:
        stop.set()
        t.join()
