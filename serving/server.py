"""An OpenAI-compatible HTTP server over one base model and many LoRA adapters: FastAPI on uvicorn.

Requests are validated by the pydantic models of serving.protocol, then queued on the engine
(serving.engine), whose generation thread batches requests that arrive together across adapters
(serving.completions). This module assembles the application (errors in OpenAI's shape, the
operations routes, the admin routes of serving.admin, request-body limits, metrics) and runs it.

Routes (OpenAPI at /docs):
    GET  /health, /ready, /metrics      liveness, readiness, Prometheus text format
    GET  /v1/models                     the base model and every served adapter
    POST /v1/completions                (serving.completions) OpenAI completions, SSE with "stream"
    POST /v1/chat/completions           through the tokenizer's chat template
    admin (serving.admin)               POST /v1/adapters, DELETE /v1/adapters/{name},
                                        POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from data.errors import UserError
from serving.adapters import AdapterExists, AdapterNotFound
from serving.admin import AdminOptions, HostCheck, admin_router
from serving.body_limit import BodyLimit
from serving.completions import completions_router
from serving.engine import Engine, QueueFull
from serving.metrics import CONTENT_TYPE, ServerMetrics
from serving.protocol import (
    ApiError,
    ErrorResponse,
    LoraInfo,
    ModelCard,
    ModelList,
)

_FIELD_HINTS = {
    "model": "the name of a served adapter or of the base model (GET /v1/models lists them)",
    "prompt": "one prompt string per request",
    "messages": 'a non-empty list of {"role": ..., "content": ...}',
    "name": "the served name of the adapter",
    "source": "NAME@ALIAS, NAME@VERSION, or a folder relative to an --adapter-root",
    "lora_name": "the served name of the adapter",
    "lora_path": "NAME@ALIAS, NAME@VERSION, or a folder relative to an --adapter-root",
    "stop": "a string or a list of at most 4 strings",
}
# pydantic names the member of a union it tried (`stop.str`, `content.list[TextPart]`): not a field.
_UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict"}


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for.

    Attributes:
        max_request_bytes: larger bodies get 413 (before they are read when Content-Length says so).
        max_new_tokens_limit: the largest `max_tokens` a request may ask for (CPU time is the cost).
        request_timeout_s: a request without an answer after this long gets 503.
        body_timeout_s: a request body that has not fully arrived after this long gets 408.
        header_timeout_s: a connection whose request line and headers have not fully arrived after
            this long (from its opening, or from its previous response) is closed: 100 sockets sending
            partial headers would otherwise be held open for ever (slowloris).
        max_connections: connections and requests in progress beyond this many get 503 (uvicorn's
            limit_concurrency).
    """

    max_request_bytes: int = 1_000_000
    max_new_tokens_limit: int = 512
    request_timeout_s: float = 600.0
    body_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    max_connections: int = 1024


def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a header deadline (ServerLimits.header_timeout_s): uvicorn's own
    keep-alive timer is cancelled by every byte received, so trickled partial headers never time out."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            waiting = self.cycle is None or self.cycle.response_complete  # no request in progress
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the headers are in: the body has its own timeout

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's headers on this keep-alive connection

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline


def _validation_error(exc: RequestValidationError) -> ApiError:
    """pydantic's first complaint as one OpenAI-shaped 400 that names the field and the fix."""
    error = exc.errors()[0]
    loc = [p for p in error["loc"] if p != "body" and not (isinstance(p, str) and (p in _UNION_MEMBERS or "[" in p))]
    field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    if error["type"] == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return ApiError(400, f"The body is not valid JSON ({detail}): send one JSON object.")
    if not loc or isinstance(loc[0], int):
        return ApiError(
            400, "The body must be a JSON object, sent with `Content-Type: application/json`."
        )
    param = str(loc[0])
    hint = _FIELD_HINTS.get(field)
    if error["type"] == "missing":
        return ApiError(400, f"`{field}` is required" + (f": {hint}." if hint else "."), param=param)
    message = str(error["msg"]).removeprefix("Value error, ").rstrip(".")
    if error["type"] == "extra_forbidden":
        message = f"`{field}` is not a field of this request; leave it out"
    elif error["type"] != "value_error":
        message = f"`{field}`: {message}" + (f" ({hint})" if hint else "")
    return ApiError(400, message + ".", param=param)


def _redactor(roots: tuple[Path, ...]):
    """Replaces absolute paths the server knows (adapter roots, working and home directories) in
    error messages, so no answer discloses where files live."""
    labels: dict[str, str] = {}
    for root in roots:
        labels[os.path.realpath(root)] = "<adapter-root>"
        labels[str(Path(root).absolute())] = "<adapter-root>"
    labels.setdefault(os.getcwd(), ".")
    labels.setdefault(str(Path.home()), "~")
    ordered = sorted(((p, label) for p, label in labels.items() if len(p) > 1), key=lambda x: -len(x[0]))

    def redact(text: str) -> str:
        for prefix, label in ordered:
            text = text.replace(prefix, label)
        return text

    return redact


def create_app(
    engine: Engine,
    limits: ServerLimits | None = None,
    admin: AdminOptions | None = None,
    hosts: HostCheck | None = None,
) -> FastAPI:
    """The FastAPI application serving `engine`.

    Args:
        engine: the base model, its adapter pool and its generation thread.
        limits: request limits (defaults: ServerLimits()).
        admin: admin route options; None turns the admin routes off.
        hosts: which Host headers the admin routes accept (default: loopback names only).
    """
    limits = limits or ServerLimits()
    admin = admin or AdminOptions()
    hosts = hosts or HostCheck.for_address("127.0.0.1", "127.0.0.1", admin.allowed_hosts)
    metrics = ServerMetrics(engine)
    redact = _redactor(admin.adapter_roots)
    started = int(time.time())
    app = FastAPI(
        title="LowRegret serve",
        summary="One base model, many LoRA adapters, OpenAI-compatible.",
        redoc_url=None,
        responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    )

    # --- errors: every failure answers in OpenAI's shape ------------------------------------------

    def error_response(exc: ApiError) -> JSONResponse:
        body = exc.body()
        body["error"]["message"] = redact(body["error"]["message"])
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code in (404, 405):
            message = f"No route {request.method} {request.url.path}. See GET /v1/models, /docs and docs/SERVING.md."
        else:
            message = str(exc.detail)
        return error_response(ApiError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(AdapterNotFound)
    async def _no_such_model(request: Request, exc: AdapterNotFound):
        served = ", ".join([engine.base_name, *(e.name for e in engine.pool.entries())])
        message = f"The model {exc.args[0]!r} is not served here. Served models: {served}."
        return error_response(ApiError(404, message, "model", "model_not_found"))

    @app.exception_handler(AdapterExists)
    async def _taken(request: Request, exc: AdapterExists):
        return error_response(ApiError(409, str(exc), "name", "adapter_exists"))

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return error_response(ApiError(400, str(exc)))

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull):
        message = f"The server is busy ({engine.max_pending} requests waiting or running): retry shortly."
        return error_response(ApiError(429, message, code="queue_full", headers={"Retry-After": "1"}))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error_response(ApiError(500, f"Internal error: {type(exc).__name__}: {exc}"))

    # --- operations -------------------------------------------------------------------------------

    @app.get("/health", tags=["operations"])
    async def health() -> dict:
        """Liveness, with the batching counters."""
        stats = dict(vars(engine.stats))  # not asdict: it rebuilds the Counter from (key, count) pairs
        stats["batch_sizes"] = {str(rows): n for rows, n in sorted(engine.stats.batch_sizes.items())}
        return {
            "status": "ok",
            "base": engine.base_name,
            "resident_adapters": engine.pool.resident_names(),
            "stats": stats,
        }

    @app.get("/ready", tags=["operations"])
    async def ready() -> JSONResponse:
        """200 while the generation thread runs and the queue has room, 503 otherwise."""
        if not engine.alive:
            return JSONResponse({"status": "stopped"}, status_code=503)
        if engine.waiting + engine.running >= engine.max_pending:
            return JSONResponse({"status": "busy"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["operations"])
    async def prometheus() -> Response:
        """Prometheus text format: requests, latency, tokens, adapters, queue depth, batch sizes."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        """The base model and every served adapter (`parent` is the base)."""
        cards = [ModelCard(id=engine.base_name, created=started)]
        for entry in engine.pool.entries():
            lora = LoraInfo(
                rank=entry.rank,
                source=entry.source,
                version=entry.version,
                resident=engine.pool.is_resident(entry.name),
            )
            cards.append(
                ModelCard(id=entry.name, created=started, parent=engine.base_name, root=entry.source, lora=lora)
            )
        return ModelList(data=cards)

    app.include_router(completions_router(engine, metrics, error_response, limits.max_new_tokens_limit,
                                          limits.request_timeout_s))  # fmt: skip
    app.include_router(admin_router(engine, admin, hosts))
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes, timeout_s=limits.body_timeout_s)
    app.add_middleware(metrics.middleware)  # outermost: counts the 408/413 answers too
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` (port 0: a free port), or a UserError that says why not.

    Bound before the model loads, so a port in use fails in a second, not after the load.
    """
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535 (got {port}); 0 picks a free port.")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise UserError(
            f"--host {host!r} is not an address this machine can listen on ({exc.strerror}): use an IP "
            "address such as 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)."
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reasons = {
            errno.EADDRINUSE: f"port {port} on {host} is already in use (another server listens there): "
            "stop it, or pick another --port (0 picks a free one).",
            errno.EACCES: f"port {port} needs privileges this user does not have: pick a port above 1023.",
            errno.EADDRNOTAVAIL: f"{host} is not an address of this machine: use 127.0.0.1 or 0.0.0.0.",
        }
        reason = reasons.get(exc.errno, f"{exc.strerror}. Check --host and --port.")
        raise UserError(f"Cannot listen on {host}:{port}: {reason}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_server(
    engine: Engine,
    sock: socket.socket,
    host: str,
    limits: ServerLimits | None = None,
    admin: AdminOptions | None = None,
    log_level: str = "warning",
) -> uvicorn.Server:
    """The uvicorn server for `engine` on an already bound socket (run it with `.run(sockets=[sock])`)."""
    admin = admin or AdminOptions()
    hosts = HostCheck.for_address(host, sock.getsockname()[0], admin.allowed_hosts)
    config = uvicorn.Config(
        create_app(engine, limits, admin, hosts),
        lifespan="off",
        log_config=None,  # the CLI's logging configuration, not uvicorn's own
        log_level=log_level,
        timeout_keep_alive=5,  # idle keep-alive connections close after 5 s (uvicorn's default)
        http=header_timeout_protocol((limits or ServerLimits()).header_timeout_s),
        limit_concurrency=(limits or ServerLimits()).max_connections,
        timeout_graceful_shutdown=30,
        server_header=False,
    )
    return uvicorn.Server(config)


@dataclass
class RunningServer:
    """A server answering on a background thread (tests, benchmarks); `stop()` ends it."""

    url: str
    engine: Engine
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()


def start_server(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: ServerLimits | None = None,
    admin: AdminOptions | None = None,
) -> RunningServer:
    """Bind `host:port` (port 0: a free port) and answer on a daemon thread."""
    sock = bind_socket(host, port)
    server = uvicorn_server(engine, sock, host, limits, admin)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lowregret-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    return RunningServer(url_of(sock), engine, server, thread)
