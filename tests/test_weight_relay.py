"""Weight relays over real gRPC, real Redis (a run name of its own) and a real relay process:
byte-identical re-serving, learner egress with several workers, fallback when a relay dies,
token and TLS on every hop, and relay off."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import torch
import yaml

from rlrt_core.config import RunConfig
from rlrt_core.metrics import service_metrics
from rlrt_core.weights import WeightClient, WeightServer, WeightServiceError, announce_version
from rlrt_core.weights.relay import (
    RelayRecord,
    RelaySources,
    WeightRelay,
    live_relays,
    order_relays,
    register_relay,
    relays_key,
)
from services.common.weight_sync import WeightSync

TOKEN = "relay-test-token"
REDIS_URL_TEST = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parents[1]


def state(seed: int, n: int = 20_000) -> dict[str, torch.Tensor]:
    """A small model-like state; successive seeds change ~5% of the values (delta-friendly)."""
    g = torch.Generator().manual_seed(0)
    base = {"embed.weight": torch.randn(n, generator=g), "layer.weight": torch.randn(64, 64, generator=g),
            "norm.weight": torch.ones(64)}
    g2 = torch.Generator().manual_seed(seed)
    for t in base.values():
        mask = torch.rand(t.shape, generator=g2) < 0.05 * seed
        t[mask] += 0.01
    return base


@pytest.fixture
def rrun():
    client = redis.Redis.from_url(REDIS_URL_TEST)
    run = f"relay-{uuid.uuid4().hex[:8]}"
    yield client, run
    keys = list(client.scan_iter(match=f"rlrt:{run}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def publish(learner: WeightServer, client, run: str, v: int) -> None:
    learner.publish(v, state(v), dtype="bfloat16")
    announce_version(client, run, v, address=learner.address, checksum=learner.checksum(v))


def make_relay(client, run: str, *, token: str = TOKEN, relay_id: str = "r0", node: str = "n0",
               tls: tuple[str, str] | None = None, **kw) -> WeightRelay:
    server = WeightServer(token=token, keep_versions=2, tls_cert=tls and tls[0], tls_key=tls and tls[1])
    server.start()
    return WeightRelay(server, client, run, relay_id=relay_id, node=node,
                       advertise=("localhost" if tls else "127.0.0.1") + f":{server.port}",
                       make_client=lambda target: WeightClient(target, token=token, tls_ca=tls and tls[0]),
                       ttl_s=kw.pop("ttl_s", 5.0), heartbeat_s=kw.pop("heartbeat_s", 1.0),
                       poll_s=kw.pop("poll_s", 0.05), **kw)


def sync_for(run: str, client, worker: str, relay: str = "auto", **transport) -> tuple[WeightSync, object]:
    cfg = RunConfig(run_name=run, transport={"weights_token": TOKEN, "weights_relay": relay,
                                             "weights_node": "n0", **transport})
    m = service_metrics("rollout", run, worker)
    loaded: dict[str, torch.Tensor] = {}

    def load(pairs, _version: int) -> None:
        loaded.clear()
        loaded.update({n: t.clone() for n, t in pairs})

    sync = WeightSync(cfg, client, load, version=-1, metrics=m)
    sync.loaded = loaded
    return sync, m


def value(metric) -> float:
    return metric._value.get()


def test_relay_serves_the_learners_bytes(rrun) -> None:
    client, run = rrun
    with WeightServer(token=TOKEN, keep_versions=2) as learner:
        relay = make_relay(client, run)
        try:
            for v in (1, 2):
                publish(learner, client, run, v)
                assert relay.sync_once() == v
                with WeightClient(relay.advertise, token=TOKEN) as c, WeightClient(learner.address, token=TOKEN) as lc:
                    got, want = c.pull(v).held, lc.pull(v).held
                assert got.checksum == want.checksum == learner.checksum(v)
                assert [(t.name, t.dtype, t.shape, bytes(t.raw)) for t in got.tensors] == \
                    [(t.name, t.dtype, t.shape, bytes(t.raw)) for t in want.tensors]
            # version 2 came from the learner as a delta from the relay's copy of version 1
            assert relay.pulls == {"full": 1, "delta": 1, "fallback": 0}
            rec = live_relays(client, run)
            assert [(r.relay_id, r.versions) for r in rec] == [("r0", (1, 2))]
        finally:
            relay.close()
            relay.server.stop(0)
    assert live_relays(client, run) == []  # a relay that stops cleanly leaves the registry


def test_four_workers_through_one_relay_cost_the_learner_one_copy(rrun) -> None:
    client, run = rrun
    with WeightServer(token=TOKEN, keep_versions=2) as learner:
        relay = make_relay(client, run)
        stop = threading.Event()
        t = threading.Thread(target=relay.run, args=(stop,), daemon=True)
        t.start()
        syncs = [sync_for(run, client, f"w{i}") for i in range(4)]
        try:
            for v in (1, 2, 3):
                before, relay_pulled = learner.bytes_sent, relay.pulled_bytes
                publish(learner, client, run, v)
                threads = [threading.Thread(target=s.sync) for s, _ in syncs]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join(30)
                for s, _ in syncs:
                    assert s.version == v and s.held.checksum == learner.checksum(v)
                sent = learner.bytes_sent - before
                one_copy = relay.pulled_bytes - relay_pulled  # what one worker's pull of v costs
                assert 0 < sent == one_copy, (v, sent, one_copy)
            full = sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in state(1).values())
            assert relay.server.bytes_sent > 3 * full  # the relay, not the learner, sent the 4 copies
            for s, m in syncs:
                assert value(m.weight_source_pulls.labels(source="relay")) == 3
                assert value(m.weight_source_pulls.labels(source="learner")) == 0
                assert value(m.weight_pulls.labels(kind="delta")) == 2
        finally:
            stop.set()
            t.join(10)
            relay.close()
            relay.server.stop(0)
            for s, _ in syncs:
                s.close()


def test_relay_that_stops_serving_mid_run_is_passed_over(rrun) -> None:
    """The relay's port goes away while its record is still alive: the pull fails and the
    worker takes the version from the learner at once (reason "unavailable")."""
    client, run = rrun
    with WeightServer(token=TOKEN, keep_versions=2) as learner:
        relay = make_relay(client, run, ttl_s=30.0)
        try:
            publish(learner, client, run, 1)
            relay.sync_once()
            s, m = sync_for(run, client, "w0", weights_relay_wait_s=0.0)
            assert s.sync() == 1 and value(m.weight_source_pulls.labels(source="relay")) == 1
            relay.server.stop(0)  # dead port; record still listed (its TTL has not run out)
            relay.server.publish(2, state(2), dtype="bfloat16")  # would hold it, but cannot serve it
            relay.heartbeat()
            publish(learner, client, run, 2)
            assert s.sync() == 2 and s.held.checksum == learner.checksum(2)
            assert value(m.weight_source_fallbacks.labels(reason="unavailable")) == 1
            assert value(m.weight_source_pulls.labels(source="learner")) == 1
            s.close()
        finally:
            relay.close()


def _relay_process(tmp_path: Path, run: str, *, redis_url: str = REDIS_URL_TEST, metrics: dict | None = None,
                   **relay) -> subprocess.Popen:
    cfg = {"run_name": run, "transport": {"redis_url": redis_url, "weights_token": TOKEN, "weights_node": "n0"},
           "metrics": {"run_dir": str(tmp_path / "run"), **(metrics or {})},
           "relay": {"host": "127.0.0.1", "port": 0, "ttl_s": 2.0, "heartbeat_s": 0.5, "poll_s": 0.05, **relay}}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "config.yaml").write_text(path.read_text())  # what `rlrt status` reads
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "services.relay", "--config", str(path), "--worker", "relay-p"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_relay_process_clients_fall_back_and_reach_the_next_version(rrun, tmp_path: Path) -> None:
    client, run = rrun
    with WeightServer(token=TOKEN, keep_versions=2) as learner:
        publish(learner, client, run, 1)
        proc = _relay_process(tmp_path, run)
        try:
            deadline = time.monotonic() + 60
            while not any(1 in r.versions for r in live_relays(client, run)):
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the relay process never served version 1"
                time.sleep(0.1)
            syncs = [sync_for(run, client, f"w{i}", weights_relay_wait_s=30.0) for i in range(2)]
            for s, m in syncs:
                assert s.sync() == 1 and value(m.weight_source_pulls.labels(source="relay")) == 1
            sent_v1 = learner.bytes_sent
            assert 0 < sent_v1 < 1.5 * syncs[0][0].held.nbytes  # one copy for two workers
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            publish(learner, client, run, 2)
            t0 = time.monotonic()
            threads = [threading.Thread(target=s.sync) for s, _ in syncs]  # both still see the relay listed
            for th in threads:
                th.start()
            for th in threads:
                th.join(30)
            for s, m in syncs:  # the dead relay's record expired (ttl 2 s): then the learner
                assert s.version == 2 and s.held.checksum == learner.checksum(2)
                assert value(m.weight_source_fallbacks.labels(reason="unavailable")) == 1
                assert value(m.weight_source_pulls.labels(source="learner")) == 1
            assert time.monotonic() - t0 < 15  # the TTL, not the 30 s wait, ended the wait
            assert live_relays(client, run) == []
            for s, _ in syncs:
                s.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_relay_checks_the_token_of_its_clients_and_presents_it_upstream(rrun) -> None:
    client, run = rrun
    with WeightServer(token=TOKEN, keep_versions=2) as learner:
        publish(learner, client, run, 1)
        wrong = make_relay(client, run, token="not-the-run-token", relay_id="r-wrong")
        relay = make_relay(client, run)
        try:
            with pytest.raises(WeightServiceError, match="UNAUTHENTICATED"):
                wrong.sync_once()  # the learner refuses a relay without the run's token
            assert wrong.server.latest_version is None
            (rec,) = [r for r in live_relays(client, run) if r.relay_id == "r-wrong"]
            assert rec.versions == () and rec.pulling == -1  # workers do not wait on it
            relay.sync_once()
            with WeightClient(relay.advertise, token="bad") as c:
                with pytest.raises(WeightServiceError, match="UNAUTHENTICATED"):
                    c.pull(1)
            assert relay.server.bytes_sent == 0
        finally:
            for r in (wrong, relay):
                r.close()
                r.server.stop(0)


def test_tls_on_both_hops(rrun, tmp_path: Path) -> None:
    from tests.test_weights import _self_signed

    client, run = rrun
    cert, key = _self_signed(tmp_path)
    with WeightServer(token=TOKEN, tls_cert=str(cert), tls_key=str(key)) as learner:
        learner.publish(1, state(1), dtype="bfloat16")
        announce_version(client, run, 1, address=f"localhost:{learner.port}")
        relay = make_relay(client, run, tls=(str(cert), str(key)))
        try:
            assert relay.sync_once() == 1
            s, m = sync_for(run, client, "w0", tls_ca=str(cert))
            assert s.sync() == 1 and s.held.checksum == learner.checksum(1)
            assert value(m.weight_source_pulls.labels(source="relay")) == 1
            with WeightClient(relay.advertise, token=TOKEN, rpc_timeout_s=2.0) as plain:  # plain text refused
                with pytest.raises(WeightServiceError, match="UNAVAILABLE"):
                    plain.latest_version()
            s.close()
        finally:
            relay.close()
            relay.server.stop(0)


def test_relay_off_pulls_from_the_learner(rrun) -> None:
    client, run = rrun
    with WeightServer(token=TOKEN, keep_versions=2) as learner:
        relay = make_relay(client, run)
        try:
            publish(learner, client, run, 1)
            relay.sync_once()
            s, m = sync_for(run, client, "w0", relay="off")
            assert s.sync() == 1 and s.held.checksum == learner.checksum(1)
            assert value(m.weight_source_pulls.labels(source="learner")) == 1
            assert value(m.weight_source_pulls.labels(source="relay")) == 0
            assert relay.server.bytes_sent == 0
            s.close()
        finally:
            relay.close()
            relay.server.stop(0)


def test_workers_prefer_their_node_and_spread_over_the_rest(rrun) -> None:
    client, run = rrun
    now = time.time()
    recs = [RelayRecord(f"r{i}", f"127.0.0.1:{1000 + i}", f"n{i}", (1,), now) for i in range(4)]
    for r in recs:
        register_relay(client, run, r, ttl_s=5.0)
    live = live_relays(client, run)
    assert sorted(r.relay_id for r in live) == ["r0", "r1", "r2", "r3"]
    assert order_relays(live, worker_id="w", node="n2")[0].relay_id == "r2"
    firsts = [order_relays(live, worker_id=f"w{i}", node="elsewhere")[0].relay_id for i in range(400)]
    assert all(60 <= firsts.count(f"r{i}") <= 140 for i in range(4)), [firsts.count(f"r{i}") for i in range(4)]
    client.delete(f"rlrt:{run}:weights:relay:r1")  # expired
    assert "r1" not in {r.relay_id for r in live_relays(client, run)}
    assert client.sismember(relays_key(run), "r1") == 0  # pruned from the index


def test_workers_wait_for_a_relay_that_is_pulling_the_version(rrun) -> None:
    """A big version can take longer than weights_relay_wait_s to reach the relay: while its
    record says it is pulling that version the worker keeps waiting; otherwise it moves on."""
    client, run = rrun
    src = RelaySources(client, run, worker_id="w", node="n0", wait_s=0.3, poll_s=0.02)
    rec = RelayRecord("r0", "127.0.0.1:1", "n0", (1,), time.time(), pulling=2)
    register_relay(client, run, rec, ttl_s=5.0)
    done = RelayRecord("r0", "127.0.0.1:1", "n0", (1, 2), time.time())
    later = threading.Timer(1.0, lambda: register_relay(redis.Redis.from_url(REDIS_URL_TEST), run, done, ttl_s=5.0))
    later.start()
    t0 = time.monotonic()
    assert src.wait_until_held("r0", 2) == "ok" and time.monotonic() - t0 >= 0.9
    later.join()
    t0 = time.monotonic()
    assert src.wait_until_held("r0", 3) == "behind" and 0.3 <= time.monotonic() - t0 < 1.0
    register_relay(client, run, rec, ttl_s=0.3)  # pulling, then killed: its record expires
    assert src.wait_until_held("r0", 2) == "unavailable"


def test_local_launcher_starts_relays_when_configured(rrun, tmp_path: Path) -> None:
    from services.launcher import LocalRun

    client, run = rrun
    cfg = RunConfig(run_name=run, transport={"redis_url": REDIS_URL_TEST, "weights_token": TOKEN},
                    metrics={"run_dir": str(tmp_path / "run")}, launcher={"relays": 2})
    lr = LocalRun(cfg, extra_env={"PYTHONPATH": str(ROOT)})
    lr.prepare()
    assert lr.cfg.transport.weights_relay == "auto"  # the workers use them
    relays = [c for c in lr.children if c.service == "relay"]
    assert [c.worker for c in relays] == ["relay-0", "relay-1"]
    try:
        for c in relays:
            c.start()
        deadline = time.monotonic() + 60
        while sorted(r.relay_id for r in live_relays(client, run)) != ["relay-0", "relay-1"]:
            assert all(c.alive() for c in relays), [c.log_path.read_text()[-2000:] for c in relays]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for c in relays:
            c.signal(signal.SIGTERM)
            c.proc.wait(30)
        assert live_relays(client, run) == []  # a stopped relay removes its record
    finally:
        for c in relays:
            c.signal(signal.SIGKILL)
            c.close()
    off = RunConfig(run_name=run, transport={"redis_url": REDIS_URL_TEST, "weights_token": TOKEN},
                    metrics={"run_dir": str(tmp_path / "run2")})
    lr2 = LocalRun(off)
    lr2.prepare()
    assert lr2.cfg.transport.weights_relay == "off" and not [c for c in lr2.children if c.service == "relay"]


def test_relay_service_refuses_a_config_it_cannot_run(caplog) -> None:
    from services.relay.main import run as relay_main

    with caplog.at_level("ERROR"):
        assert relay_main(RunConfig(), "relay-t") == 2  # no token
        assert "needs a shared token" in caplog.text
        caplog.clear()
        assert relay_main(RunConfig(transport={"weights_token": TOKEN}), "relay-t") == 2  # no Redis
        assert "no Redis URL" in caplog.text


# -- the relay's admin app: health, readiness, metrics, `rlrt status` ----------------------


def _admin(tmp_path: Path, proc: subprocess.Popen) -> str:
    """Base URL of the relay process's admin app, from the registration it announces."""
    from services.launcher import service_endpoints

    deadline = time.monotonic() + 60
    while True:
        eps = [e for e in service_endpoints(tmp_path / "run") if e["worker"] == "relay-p"]
        if eps:
            return f"http://{eps[0]['host']}:{eps[0]['admin_port']}"
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the relay never announced its admin port"
        time.sleep(0.1)


def _scrape(base: str) -> dict[tuple[str, str], float]:
    """{(sample name, kind label or ""): value} of the relay's rlrt_relay_* samples."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=5).text):
        for smp in fam.samples:
            if smp.name.startswith("rlrt_relay_") and not smp.name.endswith("_created"):
                assert smp.labels["service"] == "relay" and smp.labels["worker"] == "relay-p"
                out[(smp.name, smp.labels.get("kind", ""))] = smp.value
    return out


def _until(check, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.slow
def test_relay_admin_app_metrics_readiness_and_status(rrun, tmp_path: Path) -> None:
    import httpx
    from rich.console import Console

    from services.progress import collect_status, render_status

    client, run = rrun
    with WeightServer(token=TOKEN, keep_versions=2) as learner:
        proc = _relay_process(tmp_path, run, max_behind_s=1.0)
        try:
            base = _admin(tmp_path, proc)
            r = _until(lambda: (x := httpx.get(f"{base}/readyz", timeout=5)).status_code == 503
                       and "relay" in str(x.json()["services"]) and x, "no /readyz answer")
            assert "holds no weight version yet (no version announced yet" in r.json()["reason"]
            assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
            m = _scrape(base)
            assert m[("rlrt_relay_weight_version", "")] == -1 and m[("rlrt_relay_announced_version", "")] == -1

            publish(learner, client, run, 1)
            _until(lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200, "never ready on version 1")
            assert httpx.get(f"{base}/readyz", timeout=5).json()["reason"] == "serving version 1"
            syncs = [sync_for(run, client, f"w{i}", weights_relay_wait_s=30.0) for i in range(2)]
            for s, _ in syncs:
                assert s.sync() == 1
            m = _until(lambda: (x := _scrape(base))[("rlrt_relay_client_streams_total", "full")] == 2 and x,
                       "the relay's metrics never counted two full streams")
            received = sum(value(wm.weight_received_bytes) for _, wm in syncs)
            assert m[("rlrt_relay_sent_bytes_total", "")] == received > 0  # its egress, byte for byte
            assert m[("rlrt_relay_pulled_bytes_total", "")] == learner.bytes_sent  # one copy from the learner
            assert m[("rlrt_relay_pulls_total", "full")] == 1 and m[("rlrt_relay_pulls_total", "delta")] == 0
            assert m[("rlrt_relay_weight_version", "")] == 1 == m[("rlrt_relay_announced_version", "")]
            assert m[("rlrt_relay_held_versions", "")] == 1 and m[("rlrt_relay_pull_seconds_count", "")] == 1
            assert m[("rlrt_relay_upstream_failures_total", "")] == 0

            publish(learner, client, run, 2)
            for s, _ in syncs:
                assert s.sync() == 2
            m = _until(lambda: (x := _scrape(base))[("rlrt_relay_client_streams_total", "delta")] == 2 and x,
                       "the relay's metrics never counted two delta streams")
            assert m[("rlrt_relay_pulls_total", "delta")] == 1 and m[("rlrt_relay_weight_version", "")] == 2
            assert m[("rlrt_relay_held_versions", "")] == 2
            assert m[("rlrt_relay_sent_bytes_total", "")] == sum(value(wm.weight_received_bytes) for _, wm in syncs)
            st = httpx.get(f"{base}/status", timeout=5).json()
            assert st["service"] == "relay" and st["version"] == 2 and st["versions"] == [1, 2]
            assert st["counters"]["bytes_sent"] == m[("rlrt_relay_sent_bytes_total", "")]

            # `rlrt status`: the live relay from the registry, with what it holds and sent
            sent = m[("rlrt_relay_sent_bytes_total", "")]
            # the record is rewritten every relay.heartbeat_s (0.5 s): wait for the one after the pulls
            snap = _until(lambda: (x := collect_status(tmp_path / "run"))["relays"]
                          and x["relays"][0]["bytes_sent"] == sent and x, "the registry never showed the bytes sent")
            [rel] = snap["relays"]
            assert rel["relay_id"] == "relay-p" and rel["node"] == "n0" and rel["versions"] == [1, 2]
            assert any(sv["worker"] == "relay-p" and sv["alive"] for sv in snap["services"])
            con = Console(record=True, width=200)
            con.print(render_status(snap))
            text = con.export_text()
            assert "weight relays (live)" in text and rel["address"] in text and "1,2" in text

            # the upstream goes away with a new version announced: unready past max_behind_s, still alive
            learner.stop(grace_s=0)
            announce_version(client, run, 3, address=learner.address, checksum="0" * 64)
            r = _until(lambda: (x := httpx.get(f"{base}/readyz", timeout=5)).status_code == 503 and x,
                       "a relay that cannot reach its upstream stayed ready")
            assert "holds version 2, version 3 announced" in r.json()["reason"]
            assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
            m = _scrape(base)
            assert m[("rlrt_relay_upstream_failures_total", "")] >= 1
            assert m[("rlrt_relay_announced_version", "")] == 3 and m[("rlrt_relay_weight_version", "")] == 2
            for s, _ in syncs:
                s.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert live_relays(client, run) == [] and collect_status(tmp_path / "run")["relays"] == []
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.slow
def test_relay_unhealthy_when_its_registry_writes_keep_failing(tmp_path: Path) -> None:
    import httpx

    from rlrt_core.transport.embedded import EmbeddedRedis

    private = EmbeddedRedis(tmp_path / "redis", port=0, appendonly=False)
    url = private.start()
    client = redis.Redis.from_url(url)
    run = "relay-redis-down"
    proc = None
    try:
        with WeightServer(token=TOKEN, keep_versions=2) as learner:
            publish(learner, client, run, 1)
            proc = _relay_process(tmp_path, run, redis_url=url, metrics={"stall_timeout_s": 1.5},
                                  ttl_s=1.0, heartbeat_s=0.3)
            base = _admin(tmp_path, proc)
            _until(lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200, "never ready")
            assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
            private.stop()
            h = _until(lambda: (x := httpx.get(f"{base}/healthz", timeout=5)).status_code == 503 and x,
                       "a relay that cannot write its registry record stayed healthy")
            assert h.json()["waiting_for"] == "redis (relay registry)"
            r = httpx.get(f"{base}/readyz", timeout=5)
            assert r.status_code == 503 and "registry record is gone" in r.json()["reason"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0  # stops cleanly without Redis
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        client.close()
        private.stop()
