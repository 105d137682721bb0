"""WeightService over real gRPC on loopback, and version announcements on real Redis."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import redis
import torch

from rlrt_core.config import TransportConfig
from rlrt_core.weights import (
    ChecksumMismatchError,
    WeightClient,
    WeightServer,
    WeightServiceError,
    announce_version,
    ensure_token_file,
    read_announced_version,
    read_announcement,
    wait_for_version,
)
from rlrt_core.weights.announce import channel_name

TOKEN = "test-token"
REDIS_URL_TEST = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/0")


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(64, 48, generator=g),            # spans many chunks
        "model.layers.0.self_attn.q_proj.weight": torch.randn(48, 48, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(48, generator=g).half(),
        "counter": torch.tensor(7, dtype=torch.int64),                            # 0-dim
        "empty": torch.zeros(0, 5),
        "mask": torch.rand(3, 3, generator=g) > 0.5,
        "lm_head.weight": torch.randn(48, 8, generator=g).t(),                    # not contiguous
    }


@pytest.fixture
def server():
    with WeightServer(token=TOKEN, chunk_bytes=4096, keep_versions=2) as s:
        yield s


def client_for(s: WeightServer, **kw) -> WeightClient:
    kw.setdefault("token", TOKEN)
    kw.setdefault("chunk_bytes", 4096)
    return WeightClient(s.address, **kw)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_stream_round_trip_incremental(server: WeightServer) -> None:
    sd = small_state()
    server.publish(3, sd)
    checksum = server.checksum(3)
    with client_for(server) as c:
        info = c.version_info()
        assert (info.version, info.num_tensors, info.checksum) == (3, len(sd), checksum)
        assert info.total_bytes == sum(t.numel() * t.element_size() for t in sd.values())
        stream = c.stream()
        assert stream.version == 3 and not stream.substituted and stream.checksum is None
        got = {}
        for name, tensor in stream:
            assert stream.checksum is None  # only known once the last message arrived
            got[name] = tensor
        assert stream.checksum == checksum and stream.bytes_received == info.total_bytes
        assert_same(got, sd)
        got["model.norm.weight"].add_(1)  # writable, own memory
        version, fetched = c.fetch_state_dict(3)
        assert version == 3
        assert_same(fetched, sd)


def test_publisher_may_keep_training(server: WeightServer) -> None:
    sd = small_state()
    before = {k: v.clone() for k, v in sd.items()}
    server.publish(1, sd)
    sd["model.embed_tokens.weight"].mul_(0)  # the learner's next step changes its tensors
    with client_for(server) as c:
        assert_same(c.fetch_state_dict()[1], before)


def test_versions_are_monotonic_and_old_ones_expire(server: WeightServer) -> None:
    for v in (1, 2, 5):
        server.publish(v, small_state(v))
    for bad in (5, 4):
        with pytest.raises(ValueError, match="must increase"):
            server.publish(bad, small_state())
    assert server.versions == [2, 5]
    with client_for(server) as c:
        assert c.version_info().available_versions == [2, 5]
        assert_same(c.fetch_state_dict(2)[1], small_state(2))
        stream = c.stream(1)  # gone: the latest comes instead, and says so
        assert stream.substituted and stream.requested_version == 1 and stream.version == 5
        assert_same(dict(stream), small_state(5))


def test_token_is_required(server: WeightServer) -> None:
    server.publish(1, small_state())
    for token in ("wrong", ""):
        with client_for(server, token=token) as c:
            with pytest.raises(WeightServiceError, match="UNAUTHENTICATED") as err:
                c.latest_version()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(WeightServiceError, match="refused the token"):
                list(c.stream())
            assert c.health().latest_version == 1  # health stays open for probes
    with pytest.raises(ValueError, match="non-empty shared token"):
        WeightServer(token="")


def test_nothing_published_yet(server: WeightServer) -> None:
    with client_for(server) as c:
        assert c.latest_version() is None and c.health().serving
        with pytest.raises(WeightServiceError, match="NOT_FOUND"):
            c.stream()


def test_checksum_mismatch_is_reported_at_the_end(server: WeightServer) -> None:
    server.publish(1, small_state())
    server.checksum(1)  # wait for the background hash, then corrupt what is served
    buf = server._versions[1].buffer  # fault injection: flip one byte of the served copy
    buf[-1] ^= 0xFF
    with client_for(server) as c:
        stream = c.stream()
        seen = []
        with pytest.raises(ChecksumMismatchError, match="checksum mismatch"):
            for name, _ in stream:
                seen.append(name)
        assert len(seen) == len(small_state())  # every tensor was yielded before the verdict
        with pytest.raises(ChecksumMismatchError):
            c.fetch_state_dict()


def test_deadline_and_unreachable(server: WeightServer) -> None:
    server.publish(1, {"big": torch.zeros(4 << 20)})  # 16 MB in 4 KB chunks
    with client_for(server, timeout_s=0.05) as c:
        with pytest.raises(WeightServiceError, match="DEADLINE_EXCEEDED"):
            list(c.stream())
    with WeightClient("127.0.0.1:1", token=TOKEN, rpc_timeout_s=1.0) as c:
        with pytest.raises(WeightServiceError, match="UNAVAILABLE"):
            c.latest_version()


def test_chunk_size_is_capped_by_the_server(server: WeightServer) -> None:
    server.publish(1, small_state())
    with client_for(server, chunk_bytes=1 << 20) as c:  # asks for more than the server sends
        assert_same(c.fetch_state_dict()[1], small_state())


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with WeightServer(token=TOKEN, tls_cert=str(cert), tls_key=str(key), chunk_bytes=4096) as s:
        s.publish(1, small_state())
        with WeightClient(s.address, token=TOKEN, tls_ca=str(cert), chunk_bytes=4096) as c:
            assert_same(c.fetch_state_dict()[1], small_state())
        with WeightClient(s.address, token=TOKEN, rpc_timeout_s=2.0) as plain:  # plain text to a TLS port
            with pytest.raises(WeightServiceError, match="UNAVAILABLE"):
                plain.latest_version()
        other = tmp_path / "other"
        other.mkdir()
        other_cert, _ = _self_signed(other)  # a certificate the server's does not chain to
        with WeightClient(s.address, token=TOKEN, tls_ca=str(other_cert), rpc_timeout_s=2.0) as wrong_ca:
            with pytest.raises(WeightServiceError, match="UNAVAILABLE"):
                wrong_ca.latest_version()


def test_from_config_with_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "weights.token"
    token = ensure_token_file(token_file)
    assert ensure_token_file(token_file) == token and (token_file.stat().st_mode & 0o777) == 0o600
    cfg = TransportConfig(weights_port=0, weights_token_file=str(token_file), weights_chunk_bytes=8192)
    with WeightServer.from_config(cfg) as s:
        s.publish(0, small_state())
        cfg.weights_port = s.port
        with WeightClient.from_config(cfg) as c:
            assert c.latest_version() == 0
    with pytest.raises(ValueError, match="needs a shared token"):
        WeightServer.from_config(TransportConfig())


# --------------------------------------------------------------------------------------
# Announcements on Redis


@pytest.fixture
def rclient():
    client = redis.Redis.from_url(REDIS_URL_TEST)
    run = f"ann-{uuid.uuid4().hex[:8]}"
    yield client, run
    keys = list(client.scan_iter(match=f"rlrt:{run}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_announce_and_read(rclient) -> None:
    client, run = rclient
    assert read_announced_version(client, run) is None and read_announcement(client, run) is None
    pubsub = client.pubsub()
    pubsub.subscribe(channel_name(run))
    pubsub.get_message(timeout=1.0)  # subscription confirmation
    announce_version(client, run, 1, address="127.0.0.1:5", checksum="abc")
    announce_version(client, run, 1)  # same version again: a restarted learner re-announcing
    announce_version(client, run, 2, address="127.0.0.1:5")
    assert read_announced_version(client, run) == 2
    a = read_announcement(client, run)
    assert a.version == 2 and a.address == "127.0.0.1:5" and a.at > 0
    msg = pubsub.get_message(timeout=1.0)
    assert msg and msg["data"] == b"1"
    pubsub.close()
    with pytest.raises(ValueError, match="lower than the announced version 2"):
        announce_version(client, run, 1)


def test_wait_for_version(rclient) -> None:
    client, run = rclient
    announce_version(client, run, 0)
    assert wait_for_version(client, run, 0, timeout_s=1) == 0
    t = threading.Timer(0.3, lambda: announce_version(redis.Redis.from_url(REDIS_URL_TEST), run, 3))
    t.start()
    start = time.monotonic()
    assert wait_for_version(client, run, 2, timeout_s=10, block_ms=5000) == 3
    assert time.monotonic() - start < 3  # woken by the notice, not by polling
    t.join()
    with pytest.raises(TimeoutError, match="no weight version >= 9"):
        wait_for_version(client, run, 9, timeout_s=0.3)


# --------------------------------------------------------------------------------------
# A real model version


@pytest.mark.slow
def test_smollm2_version_streamed_and_verified(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from rlrt_core.models import resolve_model_path

    directory = resolve_model_path("smollm2-135m-instruct")
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        sd.update(load_file(f))
    n_params = sum(t.numel() for t in sd.values())
    assert n_params > 100e6
    with WeightServer(token=TOKEN) as s:
        s.publish(1, sd)
        checksum = s.checksum(1)
        with WeightClient(s.address, token=TOKEN) as c:
            stream = c.stream(1)
            for name, tensor in stream:
                assert torch.equal(tensor, sd[name]), name
            assert stream.checksum == checksum and stream.num_tensors == len(sd)


def _with_big(seed: int) -> dict[str, torch.Tensor]:
    # 16 MB more than HTTP/2 flow control lets the server push ahead of a reader that has
    # stopped, so the server-side stream of version 1 is still open while the client pauses.
    return {**small_state(seed), "z.big": torch.full((4 << 20,), float(seed))}


def test_evicted_buffers_are_reused_only_when_unread(server: WeightServer, tmp_path: Path) -> None:
    server.publish(1, _with_big(1))
    first = server._versions[1].buffer
    with client_for(server) as c:
        stream = c.stream(1)
        got = dict([next(stream)])  # a worker is still pulling version 1 ...
        server.publish(2, _with_big(2))
        server.publish(3, _with_big(3))  # ... when it is evicted: its buffer must not be reused yet
        assert server._spare is None
        got.update(stream)
        assert_same({k: got[k] for k in small_state(1)}, small_state(1)) and stream.checksum is not None
        assert torch.equal(got["z.big"], _with_big(1)["z.big"])
        deadline = time.monotonic() + 5
        while server._spare is not first and time.monotonic() < deadline:
            time.sleep(0.01)  # the server-side stream finishes just after the client's last read
        assert server._spare is first
        server.publish(4, _with_big(4))  # reuses it, fully rewritten
        assert server._versions[4].buffer is first
        assert_same(c.fetch_state_dict(4)[1], _with_big(4))
    path = server.write_safetensors(4, tmp_path / "v4.safetensors")
    from safetensors.torch import load_file

    assert_same(load_file(path), {k: v.contiguous() for k, v in _with_big(4).items()})


def test_one_kept_version_is_overwritten_in_place_when_unread() -> None:
    # keep_versions=1 (the demo): one buffer for serving, not two, unless a stream reads it.
    with WeightServer(token=TOKEN, chunk_bytes=4096, keep_versions=1) as s, client_for(s) as c:
        s.publish(1, _with_big(1))
        s.checksum(1)  # the hash of version 1 is done: nothing reads its bytes any more
        first = s._versions[1].buffer
        s.publish(2, _with_big(2))
        assert s.versions == [2] and s._versions[2].buffer is first and s._spare is None
        assert_same(c.fetch_state_dict(2)[1], _with_big(2))  # verified against the checksum of the rewritten bytes
        s_checksum2 = s.checksum(2)
        stream = c.stream(2)
        got = dict([next(stream)])  # a worker is still pulling version 2 ...
        v2 = s._versions[2]
        s.publish(3, _with_big(3))  # ... so version 3 gets a buffer of its own
        third = s._versions[3].buffer
        assert third is not first and s.versions == [3]
        got.update(stream)
        assert_same(got, _with_big(2))  # version 2 intact, checksum verified by the stream
        assert stream.checksum == s_checksum2
        s.checksum(3)
        deadline = time.monotonic() + 5
        while v2.readers and time.monotonic() < deadline:
            time.sleep(0.01)  # the server-side stream ends just after the client's last read
        assert v2.readers == 0 and v2.evicted
        assert s._spare is None  # version 2's buffer is not kept as a second copy (keep_versions=2 would)
        s.publish(4, _with_big(4))  # version 3 is unread: overwritten in place
        assert s._versions[4].buffer is third
        assert_same(c.fetch_state_dict(4)[1], _with_big(4))


def test_a_failed_in_place_publish_never_serves_half_written_bytes() -> None:
    with WeightServer(token=TOKEN, chunk_bytes=4096, keep_versions=1) as s, client_for(s) as c:
        s.publish(1, small_state(1))
        s.checksum(1)
        with pytest.raises(TypeError):  # refused before any byte is written: version 1 stays served
            s.publish(2, {**small_state(2), "counter": 7})
        assert s.versions == [1]
        assert_same(c.fetch_state_dict(1)[1], small_state(1))
        broken = {**small_state(2), "model.norm.weight": torch.empty(48, dtype=torch.float16, device="meta")}
        with pytest.raises(Exception):  # the copy fails midway through version 1's buffer
            s.publish(2, broken)
        assert s.versions == [] and s.latest_version is None  # nothing half-written is served
        s.publish(3, small_state(3))
        assert_same(c.fetch_state_dict(3)[1], small_state(3))


# --------------------------------------------------------------------------------------
# Publish dtype (transport.weights_dtype)


def test_publish_bf16_round_trip(server: WeightServer) -> None:
    sd = small_state()
    server.publish(1, sd, dtype="bfloat16")
    want = {k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}  # ints and bools kept
    with client_for(server) as c:
        info = c.version_info()
        assert info.total_bytes == sum(t.numel() * t.element_size() for t in want.values())
        pulled = c.pull(1)
        assert pulled.kind == "full" and pulled.held.checksum == info.checksum == server.checksum(1)
        # the checksum covers the published (bf16) bytes
        assert pulled.held.compute_checksum() == info.checksum
        assert_same(dict(pulled.held.items()), want)
    with pytest.raises(ValueError, match="publish dtype"):
        server.publish(2, sd, dtype="int8")


def test_engine_loads_bf16_weights_into_fp32_model(server: WeightServer) -> None:
    from rlrt_core.engines.torch_engine import TorchEngine

    engine = TorchEngine("tiny", dtype="float32")
    src = _trained_versions(2)[1]  # a trained tiny model (tied embeddings stay tied)
    server.publish(1, src, dtype=torch.bfloat16)
    with client_for(server) as c:
        pulled = c.pull()
    engine.load_weights(pulled.held.items(), pulled.version)
    assert engine.version == 1
    params = dict(engine.model.named_parameters())
    for name, p in params.items():
        assert p.dtype == torch.float32
        assert torch.equal(p.detach(), src[name].bfloat16().float()), name  # exactly the bf16 values
        assert torch.allclose(p.detach(), src[name], rtol=2 ** -8, atol=0), name  # within bf16 precision


def test_publish_dtype_follows_the_rollout_engine() -> None:
    from rlrt_core.config import RunConfig

    assert RunConfig().weights_publish_dtype() == "float32"  # torch engine, model.dtype
    assert RunConfig(model={"dtype": "bfloat16"}).weights_publish_dtype() == "bfloat16"
    vllm = {"engine": "vllm", "vllm": {"dtype": "bfloat16"}}
    assert RunConfig(rollout=vllm).weights_publish_dtype() == "bfloat16"
    assert RunConfig(rollout={"engine": "vllm"}).weights_publish_dtype() == "float32"  # vllm "auto": model.dtype
    assert RunConfig(rollout=vllm, transport={"weights_dtype": "float16"}).weights_publish_dtype() == "float16"


# --------------------------------------------------------------------------------------
# Delta versions (wire format 2)


def _trained_versions(n: int, lr: float = 2e-5) -> list[dict[str, torch.Tensor]]:
    """State dicts of the tiny model after 0..n-1 real AdamW steps on a language-model loss."""
    from rlrt_core.models import load_model

    torch.manual_seed(0)
    model = load_model("tiny").train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    ids = torch.randint(0, int(model.config.vocab_size), (2, 24), generator=torch.Generator().manual_seed(0))
    out = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    for _ in range(n - 1):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


@pytest.mark.parametrize("encoding", ["sparse", "xor-zstd"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_delta_equals_full_bit_for_bit(encoding: str, dtype: str) -> None:
    versions = _trained_versions(4)
    with WeightServer(token=TOKEN, chunk_bytes=4096, keep_versions=2, delta_encoding=encoding) as s, \
            client_for(s) as c:
        s.publish(1, versions[0], dtype=dtype)
        held = c.pull(1).held
        sent_before = s.bytes_sent
        for v in (2, 3, 4):
            s.publish(v, versions[v - 1], dtype=dtype)
            pulled = c.pull(v, held=held)
            assert pulled.kind == "delta" and pulled.version == v and pulled.held is held
            full = c.pull(v)  # the same version in full, for comparison
            assert full.kind == "full" and full.held.checksum == pulled.held.checksum == s.checksum(v)
            assert [(t.name, t.dtype, t.shape, bytes(t.raw)) for t in held.tensors] == \
                [(t.name, t.dtype, t.shape, bytes(t.raw)) for t in full.held.tensors]
            # bf16: most values keep their rounding after a step at this lr; fp32: every value
            # moves, but only in the low mantissa bits
            assert pulled.bytes_received < full.bytes_received * (0.5 if dtype == "bfloat16" else 0.9)
            assert s.streams["delta"] == v - 1
        assert s.bytes_sent > sent_before
        # the engine would get exactly the published tensors
        want = {k: t.to(getattr(torch, dtype)) for k, t in versions[3].items()}
        assert_same(dict(held.items()), want)


def test_delta_is_encoded_once_per_pair() -> None:
    versions = _trained_versions(2)
    with WeightServer(token=TOKEN, keep_versions=2) as s, client_for(s) as a, client_for(s) as b:
        s.publish(1, versions[0], dtype="bfloat16")
        held_a, held_b = a.pull().held, b.pull().held
        s.publish(2, versions[1], dtype="bfloat16")
        pa, pb = a.pull(2, held=held_a), b.pull(2, held=held_b)
        assert pa.kind == pb.kind == "delta" and pa.bytes_received == pb.bytes_received
        assert list(s._deltas) == [(1, 2, "sparse")]
        s.publish(3, versions[1], dtype="bfloat16")  # evicts version 1, and its delta
        assert list(s._deltas) == []


def test_delta_falls_back_when_the_base_is_not_kept(server: WeightServer) -> None:
    versions = _trained_versions(3)
    with client_for(server) as c:
        server.publish(1, versions[0])
        held = c.pull().held
        server.publish(2, versions[1])
        server.publish(3, versions[2])  # keep_versions=2: version 1 is gone
        pulled = c.pull(3, held=held)
        assert pulled.kind == "fallback" and "base version 1 is not kept" in pulled.reason
        assert pulled.held.checksum == server.checksum(3) and pulled.bytes_received == c.version_info().total_bytes
        assert_same(dict(pulled.held.items()), versions[2])
        # a base the server holds under another checksum is refused as well
        stale = c.pull(2).held
        stale.checksum = "0" * 64
        assert c.pull(3, held=stale).reason.startswith("delta refused: base version 2 has another checksum")


def test_delta_falls_back_on_a_corrupt_base(server: WeightServer) -> None:
    versions = _trained_versions(2)
    want = {k: v.bfloat16() for k, v in versions[1].items()}
    with client_for(server) as c:
        server.publish(1, versions[0], dtype="bfloat16")
        held = c.pull().held
        # The worker's copy rotted in an element the step does not change (a delta that sets
        # the element's new value would repair it); it still claims version 1's checksum.
        t = held.tensors[0]
        same = torch.nonzero(torch.frombuffer(t.raw, dtype=torch.int16) == want[t.name].reshape(-1).view(torch.int16))
        t.raw[2 * int(same[0])] ^= 0x10
        server.publish(2, versions[1], dtype="bfloat16")
        pulled = c.pull(2, held=held)
        assert pulled.kind == "fallback" and "checksum mismatch" in pulled.reason
        assert pulled.held is not held and pulled.held.checksum == server.checksum(2)
        assert pulled.held.compute_checksum() == server.checksum(2)
        assert_same(dict(pulled.held.items()), want)
        assert pulled.bytes_received > c.version_info().total_bytes  # the failed delta plus the full version


def test_delta_falls_back_on_a_corrupt_chunk(server: WeightServer) -> None:
    versions = _trained_versions(2)
    with client_for(server) as c:
        server.publish(1, versions[0])
        held, spare = c.pull().held, c.pull().held
        server.publish(2, versions[1])
        assert c.pull(2, held=spare).kind == "delta"  # computes and caches the delta of (1, 2)
        payloads = server._deltas[(1, 2, "sparse")].result()
        big = max(range(len(payloads)), key=lambda i: len(payloads[i][1]))
        enc, data = payloads[big]
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 0xFF  # fault injection: one flipped byte in what is sent
        payloads[big] = (enc, bytes(bad))
        pulled = c.pull(2, held=held)
        assert pulled.kind == "fallback" and "undecodable" in pulled.reason
        assert pulled.held.compute_checksum() == server.checksum(2)
        assert_same(dict(pulled.held.items()), versions[1])


def test_weight_sync_pulls_deltas_and_counts_them(rclient) -> None:
    from rlrt_core.config import RunConfig
    from rlrt_core.engines.torch_engine import TorchEngine
    from rlrt_core.metrics import service_metrics
    from rlrt_core.weights.announce import announce_version
    from services.common.weight_sync import WeightSync

    client, run = rclient
    versions = _trained_versions(4)
    engine = TorchEngine("tiny", dtype="float32")
    m = service_metrics("rollout", run, "w0")
    with WeightServer(token=TOKEN, keep_versions=2) as s:
        cfg = RunConfig(run_name=run, transport={"weights_token": TOKEN, "weights_dtype": "bfloat16"})
        sync = WeightSync(cfg, client, engine.load_weights, version=0, metrics=m)

        def publish(v: int) -> None:
            s.publish(v, versions[v - 1], dtype=cfg.weights_publish_dtype())
            announce_version(client, run, v, address=s.address, checksum=s.checksum(v))

        def pulls(kind: str) -> float:
            return m.weight_pulls.labels(kind=kind)._value.get()

        publish(1)
        assert sync.sync() == 1 and sync.held.version == 1 and pulls("full") == 1
        full_bytes = m.weight_received_bytes._value.get()
        assert full_bytes == sync.held.nbytes
        publish(2)
        assert sync.sync() == 2 and pulls("delta") == 1 and engine.version == 2
        assert 0 < m.weight_received_bytes._value.get() - full_bytes < full_bytes / 2
        params = dict(engine.model.named_parameters())
        for name, p in params.items():
            assert torch.equal(p.detach(), versions[1][name].bfloat16().float()), name
        publish(3)
        publish(4)  # the worker missed version 3; its base (2) is evicted
        assert sync.sync() == 4 and pulls("fallback") == 1 and sync.held.checksum == s.checksum(4)
        assert (pulls("full"), pulls("delta")) == (1, 1)
        sync.close()
