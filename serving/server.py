"""An OpenAI-style HTTP server over one base model and many LoRA adapters.

The standard library's ThreadingHTTPServer: one thread per connection parses and validates the
request, then waits on the generation thread (serving.engine), which batches concurrent
requests across adapters. No web framework: the API is six routes, and every failure path
(413 before reading a body, 400 with the fix, 404 in OpenAI's shape) stays in plain sight.

Routes:
    GET    /health                 liveness, batching counters
    GET    /v1/models              the base model and every served adapter
    POST   /v1/completions         {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "stream"}
    POST   /v1/chat/completions    {"model", "messages", ...} through the tokenizer's chat template
    POST   /v1/adapters            admin: {"name", "source": "NAME@ALIAS" | "NAME@VERSION" | directory, "replace"}
    DELETE /v1/adapters/NAME       admin: stop serving an adapter
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from planner.errors import UserError
from serving.adapters import AdapterNotFound, describe_adapter
from serving.engine import Engine
from serving.generation import GenerationRequest
from serving.protocol import (
    ApiError,
    chunk_body,
    completion_body,
    new_id,
    parse_messages,
    parse_model,
    parse_prompt,
    parse_sampling,
)

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
# An oversized body is still read (and dropped) up to this size after the 413 is sent: closing a
# socket with unread data makes the kernel reset it, and the client would lose the 413.
_DRAIN_LIMIT_BYTES = 64 << 20


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for.

    Attributes:
        max_request_bytes: larger bodies get 413 before they are read.
        max_new_tokens_limit: the largest `max_tokens` a request may ask for (CPU time is the cost).
        request_timeout_s: a request waiting longer than this for its batch gets 503.
        admin_token: when set, POST/DELETE /v1/adapters need `Authorization: Bearer <token>`;
            when unset they are only open on a loopback address.
    """

    max_request_bytes: int = 1_000_000
    max_new_tokens_limit: int = 512
    request_timeout_s: float = 600.0
    admin_token: str | None = None


class LowRegretServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never blocks shutdown
    allow_reuse_address = True

    def __init__(self, address, engine: Engine, limits: ServerLimits):
        super().__init__(address, Handler)
        self.engine = engine
        self.limits = limits
        self.loopback = ipaddress.ip_address(self.server_address[0]).is_loopback

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a client may take to send its request (socket timeout)
    server: LowRegretServer

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)

    # --- plumbing -------------------------------------------------------------------------------

    def _send_json(self, status: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(
                411, "Send the body with a Content-Length header (chunked bodies are not accepted)."
            )
        try:
            n_bytes = int(length)
        except ValueError:
            raise ApiError(400, f"Content-Length {length!r} is not an integer.") from None
        if n_bytes < 0:
            raise ApiError(400, f"Content-Length {n_bytes} is negative.")
        if n_bytes > self.server.limits.max_request_bytes:
            self._unread_bytes = n_bytes
            raise ApiError(
                413,
                f"Request body of {n_bytes} bytes exceeds this server's limit of "
                f"{self.server.limits.max_request_bytes} bytes (--max-request-bytes): send a shorter prompt.",
            )
        raw = self.rfile.read(n_bytes)
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"The body is not valid JSON: {exc}.") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"The body must be a JSON object, got {type(body).__name__}.")
        return body

    def _drain(self) -> None:
        unread, self._unread_bytes = getattr(self, "_unread_bytes", 0), 0
        try:
            while 0 < unread and unread <= _DRAIN_LIMIT_BYTES:
                chunk = self.rfile.read(min(unread, 1 << 16))
                if not chunk:
                    break
                unread -= len(chunk)
        except OSError:
            pass

    def _dispatch(self, route) -> None:
        try:
            route()
        except ApiError as exc:
            # 411/413: the body was not read, so the connection cannot carry another request.
            self._send_json(exc.status, exc.body(), close=exc.status in (411, 413))
            self._drain()
        except AdapterNotFound as exc:
            name = exc.args[0]
            served = ", ".join(
                [self.server.engine.base_name, *(e.name for e in self.server.engine.pool.entries())]
            )
            error = ApiError(
                404,
                f"The model {name!r} is not served here. Served models: {served}.",
                "model",
                "model_not_found",
            )
            self._send_json(404, error.body())
        except UserError as exc:
            self._send_json(400, ApiError(400, str(exc)).body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # the server outlives any one request
            log.exception("internal error on %s %s", self.command, self.path)
            self._send_json(
                500, ApiError(500, f"Internal error: {type(exc).__name__}: {exc}").body(), close=True
            )

    def _route_path(self) -> str:
        return urlsplit(self.path).path.rstrip("/") or "/"

    def _not_found(self) -> None:
        raise ApiError(
            404, f"No route {self.command} {self._route_path()}. See GET /v1/models and docs/SERVING.md."
        )

    # --- verbs ----------------------------------------------------------------------------------

    def do_GET(self):
        routes = {"/health": self._health, "/v1/models": self._models}
        self._dispatch(routes.get(self._route_path(), self._not_found))

    def do_POST(self):
        routes = {
            "/v1/completions": lambda: self._complete("text"),
            "/v1/chat/completions": lambda: self._complete("chat"),
            "/v1/adapters": self._add_adapter,
        }
        self._dispatch(routes.get(self._route_path(), self._not_found))

    def do_DELETE(self):
        path = self._route_path()
        if path.startswith("/v1/adapters/"):
            self._dispatch(lambda: self._remove_adapter(unquote(path[len("/v1/adapters/") :])))
        else:
            self._dispatch(self._not_found)

    # --- routes ---------------------------------------------------------------------------------

    def _health(self) -> None:
        engine = self.server.engine
        resident = [e.name for e in engine.pool.entries() if engine.pool.is_resident(e.name)]
        self._send_json(
            200,
            {
                "status": "ok",
                "base": engine.base_name,
                "resident_adapters": resident,
                "stats": asdict(engine.stats),
            },
        )

    def _models(self) -> None:
        engine = self.server.engine
        created = int(time.time())
        data = [
            {
                "id": engine.base_name,
                "object": "model",
                "created": created,
                "owned_by": "lowregret",
                "parent": None,
            }
        ]
        for entry in engine.pool.entries():
            data.append(
                {
                    "id": entry.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "lowregret",
                    "parent": engine.base_name,
                    "root": entry.source,
                    "lora": {
                        "rank": entry.rank,
                        "source": entry.source,
                        "version": entry.version,
                        "path": entry.path,
                        "resident": engine.pool.is_resident(entry.name),
                    },
                }
            )
        self._send_json(200, {"object": "list", "data": data})

    def _complete(self, kind: str) -> None:
        engine, limits = self.server.engine, self.server.limits
        body = self._read_json()
        model = parse_model(body)
        adapter = engine.adapter_for(model)
        default_max = COMPLETIONS_DEFAULT_MAX_TOKENS if kind == "text" else limits.max_new_tokens_limit
        sampling = parse_sampling(body, default_max, limits.max_new_tokens_limit)
        if kind == "text":
            prompt_ids = engine.codec.encode(parse_prompt(body))
        else:
            messages = parse_messages(body)
            if not engine.codec.has_chat_template:
                raise ApiError(
                    400, f"The base model {engine.base_name!r} has no chat template: use /v1/completions."
                )
            try:
                prompt_ids = engine.codec.encode(engine.codec.chat_prompt(messages), add_special_tokens=False)
            except Exception as exc:  # jinja errors from the template (e.g. a role it rejects)
                raise ApiError(
                    400, f"The chat template rejected these messages: {exc}.", param="messages"
                ) from None
        if not prompt_ids:
            raise ApiError(400, "The prompt is empty after tokenisation: send some text.", param="prompt")
        if engine.max_context and len(prompt_ids) + sampling.max_tokens > engine.max_context:
            raise ApiError(
                400,
                f"Prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the model's "
                f"context of {engine.max_context} tokens: shorten the prompt or lower max_tokens.",
                param="max_tokens",
            )
        pieces: queue.Queue[str] = queue.Queue()
        request = GenerationRequest(
            prompt_ids=prompt_ids,
            adapter=adapter,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=sampling.stop,
            on_text=pieces.put if sampling.stream else None,
        )
        future = engine.submit(request)
        if sampling.stream:
            self._stream(kind, model, future, pieces)
            return
        try:
            result = future.result(timeout=limits.request_timeout_s)
        except TimeoutError:
            raise ApiError(
                503,
                f"No answer within {limits.request_timeout_s:.0f} s: the server is overloaded, retry later.",
            ) from None
        self._send_json(
            200,
            completion_body(
                kind, model, result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens
            ),
        )

    def _stream(self, kind: str, model: str, future, pieces: queue.Queue) -> None:
        """Server-sent events, OpenAI style: one chunk per new piece of text, then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # no Content-Length: the end of the stream ends the body
        self.close_connection = True
        self.end_headers()
        request_id = new_id(kind)

        def send(payload: dict) -> None:
            self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
            self.wfile.flush()

        if kind == "chat":
            send(chunk_body(kind, request_id, model, None, None, role="assistant"))
        deadline = time.monotonic() + self.server.limits.request_timeout_s
        while not (future.done() and pieces.empty()) and time.monotonic() < deadline:
            try:
                send(chunk_body(kind, request_id, model, pieces.get(timeout=0.05), None))
            except queue.Empty:
                continue
        if future.done() and future.exception() is None:
            result = future.result()
            final = chunk_body(kind, request_id, model, None, result.finish_reason)
            final["usage"] = {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            }
            send(final)
        else:
            error = future.exception() if future.done() else TimeoutError("no answer in time")
            send(ApiError(500, f"Generation failed: {type(error).__name__}: {error}").body())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _check_admin(self) -> None:
        token = self.server.limits.admin_token
        if token:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise ApiError(401, "Adapter admin needs `Authorization: Bearer <admin token>`.")
        elif not self.server.loopback:
            raise ApiError(403, "Adapter admin is disabled on a non-loopback address without --admin-token.")

    def _add_adapter(self) -> None:
        self._check_admin()
        body = self._read_json()
        name, source, replace = body.get("name"), body.get("source"), body.get("replace", False)
        if not isinstance(name, str) or not isinstance(source, str) or not isinstance(replace, bool):
            raise ApiError(
                400,
                'Send {"name": "<served name>", "source": "NAME@ALIAS" | "NAME@VERSION" | "/path/to/adapter", "replace": false}.',
            )
        if name == self.server.engine.base_name:
            raise ApiError(
                400, f"{name!r} is the base model's name; pick another adapter name.", param="name"
            )
        if name in self.server.engine.pool and not replace:
            raise ApiError(
                409,
                f'An adapter named {name!r} is already served: DELETE /v1/adapters/{name} first or send "replace": true.',
            )
        entry = describe_adapter(name, source)
        self.server.engine.pool.add(entry, replace=replace)
        self._send_json(
            201,
            {
                "name": entry.name,
                "source": entry.source,
                "version": entry.version,
                "rank": entry.rank,
                "path": entry.path,
            },
        )

    def _remove_adapter(self, name: str) -> None:
        self._check_admin()
        self.server.engine.pool.remove(name)
        self._send_json(200, {"name": name, "deleted": True})


@dataclass
class RunningServer:
    """A server answering on a background thread (tests, benchmarks); `stop()` ends it."""

    server: LowRegretServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.server.engine.stop()


def start_server(
    engine: Engine, host: str = "127.0.0.1", port: int = 0, limits: ServerLimits | None = None
) -> RunningServer:
    """Bind `host:port` (port 0: a free port) and answer on a daemon thread."""
    server = LowRegretServer((host, port), engine, limits or ServerLimits())
    thread = threading.Thread(target=server.serve_forever, name="lowregret-http", daemon=True)
    thread.start()
    return RunningServer(server, thread)
