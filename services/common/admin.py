"""The admin HTTP app every service runs: health, readiness, status, Prometheus metrics,
and token-protected control actions.

`/healthz` (liveness) fails when the main loop is silent, or when the service has made no
progress for `stall_timeout_s` while work waits for it or while it waits for something that
does not come (a weight version, Redis); the body says which. `/readyz` once the service can
do work (model loaded, Redis reachable), with every service of the run seen in Redis, dead
ones included; `/status` is a JSON snapshot; `/metrics` is the Prometheus exposition of the
service's own registry. Anything that changes behaviour is a POST under `/admin/...` and
needs `Authorization: Bearer <metrics.admin_token>`: the token is checked before a byte of
the body is read, and bodies are capped at `MAX_BODY_BYTES`.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # admin bodies are a few bytes of JSON


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
    # (ready, reason) in one attribute: a reader never pairs a new flag with an old reason.
    readiness: tuple[bool, str] = (False, "starting")
    status: Callable[[], dict[str, Any]] = field(default=lambda: {})
    # name -> (pydantic body model or None, handler(body) -> dict)
    actions: dict[str, tuple[type[BaseModel] | None, Callable[[Any], dict[str, Any]]]] = field(default_factory=dict)
    # Progress: last time the service finished a unit of work; `backlog` = entries waiting for
    # it (refreshed from Redis); `waiting_for` = what it blocks on right now and since when.
    last_progress: float = field(default_factory=time.time)
    stall_timeout_s: float = 600.0
    backlog: int = 0
    waiting_for: str | None = None
    waiting_since: float | None = None
    services: Callable[[], list[dict[str, Any]]] = field(default=lambda: [])
    # Extra read-only routes (FastAPI APIRouters), e.g. the learner's run explorer.
    routers: list[Any] = field(default_factory=list)

    loop_started: bool = False  # liveness counts silence only once the main loop runs

    @property
    def ready(self) -> bool:
        return self.readiness[0]

    @property
    def ready_reason(self) -> str:
        return self.readiness[1]

    def beat(self) -> None:
        self.last_heartbeat = time.time()
        self.loop_started = True

    def progressed(self) -> None:
        self.last_progress = time.time()

    def wait_for(self, what: str | None) -> None:
        """Record what the service blocks on (None: nothing)."""
        if what is None:
            self.waiting_for = self.waiting_since = None
        elif what != self.waiting_for:
            self.waiting_for, self.waiting_since = what, time.time()

    def liveness(self) -> tuple[bool, str]:
        """(alive, reason) as /healthz reports it."""
        now = time.time()
        age = now - self.last_heartbeat
        if self.loop_started and age > self.heartbeat_timeout_s:
            return False, f"main loop silent for {age:.0f}s"
        idle = now - self.last_progress
        if idle > self.stall_timeout_s and self.waiting_for is not None:
            since = now - (self.waiting_since or now)
            return False, (f"no progress for {idle:.0f}s, waiting for {self.waiting_for} for {since:.0f}s "
                           f"(stall_timeout_s={self.stall_timeout_s:.0f})")
        if idle > self.stall_timeout_s and self.backlog > 0:
            return False, (f"no progress for {idle:.0f}s while {self.backlog} entries wait for it "
                           f"(stall_timeout_s={self.stall_timeout_s:.0f})")
        return True, "ok"


class _AdminGuard:
    """ASGI middleware in front of `/admin/*`: refuse a missing or wrong token before any of
    the body is read, and refuse bodies over `MAX_BODY_BYTES` (413) while reading them."""

    def __init__(self, app: Any, state: ServiceState) -> None:
        self.app = app
        self.state = state

    @staticmethod
    async def _reply(send: Any, status: int, body: dict[str, Any], headers: list | None = None) -> None:
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not scope.get("path", "").startswith("/admin/"):
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        token = self.state.admin_token
        if not token:
            await self._reply(send, 403, {"detail": "admin actions are disabled: set metrics.admin_token"})
            return
        given = headers.get(b"authorization", b"")
        if not hmac.compare_digest(given, f"Bearer {token}".encode()):
            await self._reply(send, 401, {"detail": "missing or wrong bearer token"},
                              [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await self._reply(send, 413, {"detail": f"request body over {MAX_BODY_BYTES} bytes"})
            return
        chunks, size = [], 0
        while True:  # read the (authorised) body with a cap, then replay it to the app
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                await self._reply(send, 413, {"detail": f"request body over {MAX_BODY_BYTES} bytes"})
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def make_admin_app(state: ServiceState) -> FastAPI:
    app = FastAPI(title=f"rlrt {state.service}", docs_url=None, redoc_url=None)
    app.add_middleware(_AdminGuard, state=state)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        ok, reason = state.liveness()
        body = {"ok": ok, "reason": reason, "backlog": state.backlog,
                "seconds_since_progress": round(time.time() - state.last_progress, 1),
                "waiting_for": state.waiting_for}
        return JSONResponse(status_code=200 if ok else 503, content=body)

    def _services() -> list[dict[str, Any]]:
        try:
            return state.services()
        except Exception as err:  # Redis down: say so rather than fail the probe
            return [{"error": repr(err)}]

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready, reason = state.readiness
        body = {"ready": ready, "reason": reason, "services": _services()}
        return JSONResponse(status_code=200 if ready else 503, content=body)

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
        _register_action(app, name, body_model, handler)
    for router in state.routers:
        app.include_router(router)
    return app


class ActionRefused(ValueError):
    """An admin action that cannot be applied: answered 422 naming `field`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _register_action(app: FastAPI, name: str, body_model: type[BaseModel] | None,
                     handler: Callable[[Any], dict[str, Any]]) -> None:
    # The token was checked by _AdminGuard before the body was read; the body is parsed here.
    async def endpoint(request: Request) -> JSONResponse:
        body = None
        if body_model is not None:
            raw = await request.body()
            try:
                body = body_model.model_validate_json(raw or b"{}")
            except ValidationError as err:
                errors = [{"field": ".".join(str(p) for p in e["loc"]) or "<body>", "error": e["msg"]}
                          for e in err.errors()]
                return JSONResponse(status_code=422, content={"detail": "invalid request body", "errors": errors})
        try:
            return JSONResponse(handler(body))
        except ActionRefused as err:
            return JSONResponse(status_code=422, content={"detail": str(err),
                                                          "errors": [{"field": err.field, "error": str(err)}]})

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
