"""A real Prometheus server (Debian's `prometheus` binary) for the deployment tests.

Prometheus cannot bind port 0, so `PrometheusServer.start` picks a random loopback port,
retries on "address already in use", and reads back the address from the server's own
"Start listening for connections" log line.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

LISTENING = re.compile(r'msg="Start listening for connections" address=(\S+)')


class PrometheusServer:
    """Runs `prometheus --config.file=<config>` with its TSDB under `data_dir`."""

    def __init__(self, config: Path, data_dir: Path, binary: str = "prometheus") -> None:
        self.config = Path(config)
        self.data_dir = Path(data_dir)
        self.binary = shutil.which(binary) or binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "prometheus.log"
        self.url = ""

    def start(self, attempts: int = 20, timeout_s: float = 120.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            port = random.randint(20000, 60999)
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
                    stdout=log, stderr=subprocess.STDOUT)
            deadline = time.time() + timeout_s
            while time.time() < deadline:
                text = self.log_path.read_text(errors="replace")
                if "address already in use" in text:
                    break
                m = LISTENING.search(text)
                if m:
                    self.url = f"http://{m.group(1)}"
                    self._wait_ready(deadline)
                    return self.url
                if self.proc.poll() is not None:
                    raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{text[-3000:]}")
                time.sleep(0.1)
            else:
                self.stop()
                raise TimeoutError(f"prometheus did not listen within {timeout_s:.0f}s:\n{text[-3000:]}")
            self.stop()  # port taken: try another
        raise RuntimeError(f"no free port for prometheus after {attempts} attempts")

    def _wait_ready(self, deadline: float) -> None:
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus at {self.url} never became ready")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Result vector of an instant query (raises on a PromQL error)."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def targets(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "PrometheusServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
