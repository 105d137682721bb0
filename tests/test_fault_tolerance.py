"""Fault tolerance below the chaos suite: validation at stage boundaries, admin hardening,
truthful health, queue metrics, the ledger, seeds, ports and weight-version waits. Tests
that need Redis use the real one (REDIS_URL_TEST) with a run name of their own."""

from __future__ import annotations

import math
import os
import socket
import time
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlrt_core.config import ConfigError, build_config, check_paths
from rlrt_core.engines import derive_seed
from rlrt_core.ledger import GroupLedger
from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.transport.codec import Limits, MalformedMessage, decode, validate
from rlrt_core.transport.streams import StreamBus

REDIS_URL = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/0")


def _cfg(**over):
    run = f"ft-{uuid.uuid4().hex[:8]}"
    data = {"run_name": run, "model": {"path": "tiny", "max_model_len": 64},
            "transport": {"redis_url": REDIS_URL, "weights_port": 0}, "metrics": {"run_dir": f"/tmp/{run}"}}
    for k, v in over.items():
        data.setdefault(k, {}).update(v)
    return build_config(data, use_env=False)


def _group(gid="g", *, tokens=(5, 6, 7), version=1, k=2, run="run") -> pb.RolloutGroup:
    g = pb.RolloutGroup(group_id=gid, run_id=run, version=version, min_version=0, prompt_ids=[1, 2])
    g.problem.prompt = "1+1"
    for _ in range(k):
        g.completions.add(token_ids=list(tokens), logprobs=[-0.5] * len(tokens), finish_reason="length")
    return g


# -- configuration (faults 4 and 9) ---------------------------------------------------------

def test_in_flight_bound_is_checked_at_start_up():
    """Fault 4: (max_staleness + 1) x groups_per_step > stream_maxlen would never dispatch."""
    with pytest.raises(ConfigError, match=r"learner\.max_staleness .*stream_maxlen \(10\)"):
        build_config({"learner": {"groups_per_step": 4, "mini_batch_groups": 2}},
                     environ={"RLRT__TRANSPORT__STREAM_MAXLEN": "10", "RLRT__LEARNER__MAX_STALENESS": "10"})
    build_config({"learner": {"max_staleness": 1, "groups_per_step": 4, "mini_batch_groups": 2},
                  "transport": {"stream_maxlen": 10}}, use_env=False)


def test_missing_model_path_is_refused_naming_the_field(tmp_path):
    """Fault 9: a model directory that does not exist fails at start-up, not in a log later."""
    cfg = build_config({"model": {"path": str(tmp_path / "nope")}}, use_env=False)
    with pytest.raises(ConfigError, match=r"model\.path: .*nope.* neither a built-in model"):
        check_paths(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model\.path: .*has no config\.json"):
        check_paths(build_config({"model": {"path": str(tmp_path / "empty")}}, use_env=False))
    check_paths(build_config({"model": {"path": "tiny"}}, use_env=False))


def test_cli_refuses_a_missing_model_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from services.cli.main import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  path: {tmp_path / 'missing'}\n")
    res = CliRunner().invoke(app, ["serve", "learner", "--config", str(recipe)])
    assert res.exit_code == 2 and "model.path" in res.output
    res = CliRunner().invoke(app, ["config", "--config", str(recipe), "--no-check-paths"])
    assert res.exit_code == 0


# -- validation at the boundary (faults 2, 3, 7) -------------------------------------------

@pytest.mark.parametrize("mutate, reason", [
    (lambda g: g.completions[0].logprobs.__setitem__(1, float("nan")), "non-finite"),
    (lambda g: g.completions[0].logprobs.__setitem__(1, 3.0), "above"),
    (lambda g: g.completions[1].token_ids.__setitem__(0, 10**6), "outside the vocabulary"),
    (lambda g: g.completions[1].token_ids.__setitem__(0, -1), "outside the vocabulary"),
    (lambda g: g.completions[0].token_ids.extend([5] * 100) or g.completions[0].logprobs.extend([-1.0] * 100),
     "exceed model.max_model_len"),
    (lambda g: setattr(g, "version", -7), "< 0"),
    (lambda g: setattr(g, "version", 10**9), "ahead of the newest"),
    (lambda g: g.verifier_results.add(reward=float("inf")) and None, "verifier_results"),
    (lambda g: [g.verifier_results.add(reward=float("nan")) for _ in range(2)] and None, "non-finite"),
    (lambda g: g.completions.add(), "has no tokens"),
    (lambda g: g.ClearField("prompt_ids"), "no prompt_ids"),
])
def test_each_bad_field_of_a_group_is_named(mutate, reason):
    g = _group()
    mutate(g)
    with pytest.raises(MalformedMessage, match=reason):
        validate(g, Limits(vocab_size=1000, max_model_len=64, max_version=5))


def test_valid_group_and_task_pass():
    validate(_group(), Limits(vocab_size=1000, max_model_len=64, max_version=5))
    t = pb.PromptTask(group_id="t", run_id="run", n_samples=8, min_version=3)
    t.problem.prompt = "1+1"
    validate(t)
    for bad, why in ((dict(n_samples=5000), "n_samples=5000"), (dict(n_samples=0), "n_samples=0"),
                     (dict(min_version=-1), "min_version -1")):
        t2 = pb.PromptTask(group_id="t", run_id="run", **{"n_samples": 8, "min_version": 0, **bad})
        t2.problem.prompt = "x"
        with pytest.raises(MalformedMessage, match=why):
            validate(t2)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.binary(max_size=400), cls=st.sampled_from([pb.PromptTask, pb.RolloutGroup]))
def test_fuzz_random_bytes_only_ever_raise_malformed(data, cls):
    try:
        decode(data, cls, limits=Limits(vocab_size=1000, max_model_len=64, max_version=5))
    except MalformedMessage:
        pass


_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(version=st.integers(-10, 10**12), min_version=st.integers(-10, 10**12),
       tokens=st.lists(st.integers(-5, 2000), min_size=0, max_size=80), lp=_floats, reward=_floats,
       n_prompt=st.integers(0, 5), n_results=st.integers(0, 3))
def test_fuzz_group_fields_either_validate_or_name_a_problem(version, min_version, tokens, lp, reward, n_prompt,
                                                             n_results):
    """Every combination either validates (and then is usable: finite, in range) or raises
    MalformedMessage; nothing else escapes."""
    g = pb.RolloutGroup(group_id="g", run_id="run", version=version, min_version=min_version,
                        prompt_ids=list(range(1, n_prompt + 1)))
    for _ in range(2):
        g.completions.add(token_ids=tokens, logprobs=[lp] * len(tokens))
    for _ in range(n_results):
        g.verifier_results.add(reward=reward)
    lim = Limits(vocab_size=1000, max_model_len=64, max_version=50)
    try:
        validate(g, lim)
    except MalformedMessage:
        return
    assert 0 <= g.min_version <= g.version <= 50 and tokens and n_prompt
    assert all(0 <= t < 1000 for t in tokens) and n_prompt + len(tokens) <= 64
    assert math.isfinite(lp) and lp <= 1e-3
    assert n_results in (0, 2) and (n_results == 0 or math.isfinite(reward))


def test_a_failing_group_is_dead_lettered_alone_and_its_batch_mates_flow():
    """relay_groups on the real Redis: [valid, poison, valid] in one read; the poison is
    dead-lettered with its own reason, both valid groups reach the next stream."""
    from services.common.runtime import ServiceRuntime
    from services.common.stage import relay_groups

    cfg = _cfg()
    rt = ServiceRuntime("verifier", cfg, "v-test")
    bus = rt.bus
    try:
        bus.ensure_groups()
        for gid in ("ok-1", "bad", "ok-2"):
            bus.publish("rollouts", _group(gid, run=cfg.run_name))
        counters = {"groups": 0, "dead_lettered": 0}

        def handle(g):
            if g.group_id == "bad":
                raise ValueError("cannot check this one")
            g.verifier_results.add(reward=1.0)
            g.verifier_results.add(reward=0.0)

        assert relay_groups(rt, count=8, handle=handle, counters=counters)
        assert counters == {"groups": 2, "dead_lettered": 1}
        [d] = bus.dead_letters()
        assert d.gid == "bad" and "cannot check this one" in d.reason and d.kind == "processing_failed"
        out = bus.consume_messages("verified", "teacher", "t", pb.RolloutGroup, count=8, block_ms=0)
        assert sorted(g.group_id for _, g in out) == ["ok-1", "ok-2"]
        exposition = rt.metrics.exposition().decode()
        assert 'rlrt_dead_lettered_messages_total{' in exposition and 'reason="processing_failed"' in exposition
    finally:
        bus.delete_run()
        rt.close()


# -- health, queue metrics, service table -----------------------------------------------------

def test_liveness_tells_a_stalled_service_from_a_busy_or_idle_one():
    from prometheus_client import CollectorRegistry

    from services.common.admin import ServiceState

    s = ServiceState(service="teacher", run="r", worker="w", registry=CollectorRegistry(), stall_timeout_s=5)
    assert s.liveness()[0]                       # fresh
    s.last_progress = time.time() - 60
    assert s.liveness()[0]                       # idle with nothing to do: healthy
    s.backlog = 3
    ok, why = s.liveness()
    assert not ok and "3 entries wait" in why    # work waits and nothing moves: dead
    s.progressed()
    assert s.liveness()[0]
    s.backlog = 0
    s.wait_for("weight version 7 to be announced (latest 6)")
    s.last_progress = time.time() - 60
    ok, why = s.liveness()
    assert not ok and "weight version 7" in why
    s.wait_for(None)
    assert s.liveness()[0]


def test_every_service_exports_its_queue_depth_and_a_heartbeat():
    """Queue gauges move with the stream; the service table shows the service, then shows
    it stopped (dead ones are listed, not hidden)."""
    from services.common.runtime import ServiceRuntime, read_services

    cfg = _cfg()
    rt = ServiceRuntime("rollout", cfg, "r-test")
    try:
        rt.bus.ensure_groups()
        for i in range(3):
            t = pb.PromptTask(group_id=f"t{i}", run_id=cfg.run_name, n_samples=2)
            t.problem.prompt = "1+1"
            rt.bus.publish("prompts", t)
        rt._admin_port = 1
        rt.refresh()
        text = rt.metrics.exposition().decode()
        assert 'rlrt_bus_lag_messages{run="%s",service="rollout",stream="prompts",worker="r-test"} 3.0' \
            % cfg.run_name in text
        assert rt.state.backlog == 3
        [rec] = read_services(rt.redis, "rlrt", cfg.run_name)
        assert rec["worker"] == "r-test" and rec["alive"] is True
        rt.bus.consume("prompts", "rollout", "r-test", count=1, block_ms=0)
        rt.refresh()
        text = rt.metrics.exposition().decode()
        assert 'stream="prompts",worker="r-test"} 2.0' in text  # lag 2
        rt._heartbeat("stopped")
        [rec] = read_services(rt.redis, "rlrt", cfg.run_name)
        assert rec["alive"] is False
    finally:
        rt.bus.delete_run()
        rt.close()


def test_claims_of_idle_entries_are_counted():
    bus = StreamBus.from_url(REDIS_URL, f"ft-{uuid.uuid4().hex[:8]}", claim_idle_ms=100)
    seen = []
    bus.on_claim = lambda stream, n: seen.append((stream, n))
    try:
        bus.ensure_groups()
        t = pb.PromptTask(group_id="t", run_id=bus.run, n_samples=2)
        t.problem.prompt = "x"
        bus.publish("prompts", t)
        assert len(bus.consume("prompts", "rollout", "dead-worker", count=1, block_ms=0)) == 1
        time.sleep(0.2)
        assert len(bus.consume("prompts", "rollout", "peer", count=1, block_ms=0)) == 1
        assert seen == [("prompts", 1)]
    finally:
        bus.delete_run()


# -- admin hardening (fault 8) ------------------------------------------------------------

@pytest.fixture
def admin_server():
    from prometheus_client import CollectorRegistry
    from pydantic import BaseModel, Field

    from services.common.admin import ActionRefused, AdminServer, ServiceState

    class Body(BaseModel):
        max_staleness: int = Field(..., ge=0)

    calls = []

    def act(body):
        calls.append(body)
        if body.max_staleness > 100:
            raise ActionRefused("max_staleness", "too large for the stream bound")
        return {"max_staleness": body.max_staleness}

    state = ServiceState(service="learner", run="r", worker="w", registry=CollectorRegistry(), admin_token="s3cret",
                         actions={"staleness": (Body, act)})
    server = AdminServer(state)
    server.start()
    yield server, calls
    server.stop()


def _raw(port: int, head: bytes, body: bytes = b"", timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        return s.recv(4096)


def test_admin_refuses_before_reading_an_unauthenticated_body(admin_server):
    """A 50 MB body without a token is answered 401 before any of it is sent."""
    server, calls = admin_server
    head = (b"POST /admin/staleness HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 52428800\r\n\r\n")
    t0 = time.time()
    reply = _raw(server.port, head)  # headers only: the server must not wait for the body
    assert reply.startswith(b"HTTP/1.1 401") and time.time() - t0 < 3
    auth = b"Authorization: Bearer s3cret\r\n"
    reply = _raw(server.port, head.replace(b"Host: x\r\n", b"Host: x\r\n" + auth))
    assert reply.startswith(b"HTTP/1.1 413")
    assert calls == []


def test_admin_bodies_are_parsed_after_the_token_and_refusals_name_the_field(admin_server):
    import httpx

    server, calls = admin_server
    base = f"http://127.0.0.1:{server.port}"
    assert httpx.post(f"{base}/admin/staleness", json={"max_staleness": 2}).status_code == 401
    h = {"Authorization": "Bearer s3cret"}
    r = httpx.post(f"{base}/admin/staleness", json={"max_staleness": -1}, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "max_staleness"
    r = httpx.post(f"{base}/admin/staleness", content=b"{not json", headers=h)
    assert r.status_code == 422
    r = httpx.post(f"{base}/admin/staleness", json={"max_staleness": 500}, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "max_staleness"
    r = httpx.post(f"{base}/admin/staleness", json={"max_staleness": 3}, headers=h)
    assert r.status_code == 200 and r.json() == {"max_staleness": 3}
    assert [c.max_staleness for c in calls] == [500, 3]


# -- seeds (fault 10) and ports (fault 11) ----------------------------------------------------

def test_batch_seeds_never_repeat_across_batches_workers_or_restarts():
    assert derive_seed(None, "a") is None
    seeds = {derive_seed(0, f"run-v0-{uuid.uuid4().hex[:12]}") for _ in range(2000)}
    assert len(seeds) == 2000
    assert derive_seed(7, "g1", "g2") == derive_seed(7, "g1", "g2") != derive_seed(8, "g1", "g2")


def test_learner_weight_servers_bind_their_own_ports():
    from services.learner.main import start_weight_server

    token_file = f"/tmp/ft-token-{uuid.uuid4().hex[:6]}"
    with open(token_file, "w") as fh:
        fh.write("tok\n")
    try:
        a = start_weight_server(_cfg(transport={"weights_token_file": token_file, "weights_port": 0}))
        b = start_weight_server(_cfg(transport={"weights_token_file": token_file, "weights_port": 0}))
        try:
            assert a.port != b.port and a.port > 0 and b.port > 0
            taken = _cfg(transport={"weights_token_file": token_file, "weights_port": a.port})
            with pytest.raises(RuntimeError, match=rf"transport\.weights_port {a.port} .* stays in use"):
                start_weight_server(taken, attempts=2, delay_s=0.05)
        finally:
            a.stop()
            b.stop()
    finally:
        os.unlink(token_file)


def test_local_launcher_picks_no_ports(tmp_path):
    from services.launcher import LocalRun

    cfg = _cfg(metrics={"run_dir": str(tmp_path / "run")}, transport={"weights_port": 50051})
    run = LocalRun(cfg)
    run.prepare()
    assert run.cfg.transport.weights_port == 0 and run.cfg.transport.weights_target is None
    assert [w["worker"] for w in __import__("json").loads((tmp_path / "run" / "plan.json").read_text())] == \
        ["learner-0", "verifier-0", "teacher-0", "rollout-0"]


def test_local_launcher_threads_per_service(tmp_path, monkeypatch):
    from services.launcher import LocalRun

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = _cfg(metrics={"run_dir": str(tmp_path / "run")}, launcher={"threads": {"learner": 2}, "relays": 1})
    run = LocalRun(cfg)
    run.prepare()
    threads = {c.worker: c.env["OMP_NUM_THREADS"] for c in run.children}
    assert threads == {"learner-0": "2", "verifier-0": "1", "teacher-0": "1", "rollout-0": "1", "relay-0": "1"}
    # an OMP_NUM_THREADS of the launcher's own environment is the default for the others
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    run = LocalRun(_cfg(metrics={"run_dir": str(tmp_path / "run2")}, launcher={"threads": {"rollout": 1}}))
    run.prepare()
    assert {c.worker: c.env["OMP_NUM_THREADS"] for c in run.children} == \
        {"learner-0": "3", "verifier-0": "3", "teacher-0": "3", "rollout-0": "1"}


def test_version_waits_have_a_deadline_and_say_what_they_wait_for():
    from services.common.weight_sync import VersionWaitTimeout, WeightSync

    cfg = _cfg()
    client = redis.Redis.from_url(REDIS_URL)
    said = []
    sync = WeightSync(cfg, client, lambda *_: None, on_wait=said.append)
    t0 = time.time()
    with pytest.raises(VersionWaitTimeout, match=r"no weight version >= 3 announced .*latest none yet"):
        sync.sync(min_version=3, wait=True, timeout_s=0.5, poll_s=0.05)
    assert time.time() - t0 < 3
    assert any("weight version >= 3" in str(w) for w in said) and said[-1] is None


# -- the ledger ------------------------------------------------------------------------------

def test_ledger_identity_missing_and_round_trip():
    lg = GroupLedger()
    for i in range(6):
        lg.dispatched(f"g{i}", problem=i, version=0)
    lg.trained("g0")
    lg.dropped("g1")
    lg.dead("g2")
    assert not lg.trained("g0")  # once only
    lg.adopt("x", problem=0, version=0)
    assert lg.identity_holds() and lg.counts["adopted"] == 1
    assert lg.missing(present={"g3", "x"}) == ["g4", "g5"]
    lg.redispatched("g4", version=3)
    assert lg.outstanding["g4"].redispatches == 1 and lg.identity_holds()
    lg2 = GroupLedger()
    lg2.load_state_dict(lg.state_dict())
    assert lg2.state_dict() == lg.state_dict() and lg2.identity_holds()
