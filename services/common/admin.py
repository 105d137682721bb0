"""The admin HTTP app every service runs: health, readiness, status, Prometheus metrics,
and token-protected control actions.

`/healthz` answers while the process's main loop is alive; `/readyz` once the service can
do work (model loaded, Redis reachable); `/status` is a JSON snapshot; `/metrics` is the
Prometheus exposition of the service's own registry. Anything that changes behaviour is a
POST under `/admin/...` and needs `Authorization: Bearer <metrics.admin_token>`.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    """What the admin app reads; the service updates it from its main loop."""

    service: str
    run: str
    worker: str
    registry: CollectorRegistry
    admin_token: str | None = None
    started_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)
    heartbeat_timeout_s: float = 300.0
    ready: bool = False
    ready_reason: str = "starting"
    status: Callable[[], dict[str, Any]] = field(default=lambda: {})
    # name -> (pydantic body model or None, handler(body) -> dict)
    actions: dict[str, tuple[type[BaseModel] | None, Callable[[Any], dict[str, Any]]]] = field(default_factory=dict)

    def beat(self) -> None:
        self.last_heartbeat = time.time()


def make_admin_app(state: ServiceState) -> FastAPI:
    app = FastAPI(title=f"rlrt {state.service}", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if p != "body"), "error": e["msg"]} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": "invalid request body", "errors": errors})

    def require_token(authorization: str | None = Header(default=None)) -> None:
        if not state.admin_token:
            raise HTTPException(status_code=403, detail="admin actions are disabled: set metrics.admin_token")
        expected = f"Bearer {state.admin_token}"
        if authorization is None or not hmac.compare_digest(authorization.encode(), expected.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        age = time.time() - state.last_heartbeat
        if age > state.heartbeat_timeout_s:
            return JSONResponse(status_code=503, content={"ok": False, "reason": f"main loop silent for {age:.0f}s"})
        return JSONResponse({"ok": True})

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        if not state.ready:
            return JSONResponse(status_code=503, content={"ready": False, "reason": state.ready_reason})
        return JSONResponse({"ready": True})

    @app.get("/status")
    def status() -> JSONResponse:
        body = {"service": state.service, "run": state.run, "worker": state.worker,
                "uptime_s": round(time.time() - state.started_at, 3), "ready": state.ready}
        try:
            body.update(state.status())
        except Exception as err:  # a status snapshot must never take the endpoint down
            body["status_error"] = repr(err)
        return JSONResponse(body)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    for name, (body_model, handler) in state.actions.items():
        _register_action(app, name, body_model, handler, require_token)
    return app


def _register_action(app: FastAPI, name: str, body_model: type[BaseModel] | None,
                     handler: Callable[[Any], dict[str, Any]], require_token: Callable[..., None]) -> None:
    if body_model is None:
        def endpoint_nobody(_auth: None = Depends(require_token)) -> dict[str, Any]:
            return handler(None)
        app.post(f"/admin/{name}")(endpoint_nobody)
    else:
        def endpoint(body, _auth: None = Depends(require_token)) -> dict[str, Any]:
            return handler(body)
        # Real class objects, not postponed strings: FastAPI reads them to parse the body.
        endpoint.__annotations__ = {"body": body_model, "_auth": None, "return": dict[str, Any]}
        app.post(f"/admin/{name}")(endpoint)


class AdminServer:
    """uvicorn in a daemon thread; `port` is known after `start()` (0 = pick a free one)."""

    def __init__(self, state: ServiceState, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = state
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> int:
        import socket

        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(make_admin_app(self.state), log_level="warning", access_log=False,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"admin-{self.state.service}", daemon=True)
        self._thread.start()
        deadline = time.time() + timeout_s
        while not self._server.started and time.time() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            raise RuntimeError(f"admin HTTP server did not start on {self.host}:{self.port}")
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
