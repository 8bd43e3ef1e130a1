"""An ASGI middleware that reads each request body in full, within a size and a time limit.

uvicorn bounds header sizes and idle keep-alive connections, but not how long a body may take to
arrive: a client whose Content-Length promises more than it sends would hold its request open for
ever. Here the whole body must arrive within `timeout_s` (408 otherwise) and stay within
`max_bytes` (413, before reading when Content-Length already says so). The application then reads
the buffered body as usual.
"""

from __future__ import annotations

import asyncio
import json
import time

from serving.protocol import ApiError

# An oversized body is still read (and dropped) up to this size after deciding on 413: closing a
# socket with unread data makes the kernel reset it, and the client would lose the answer.
_DRAIN_LIMIT_BYTES = 64 << 20


async def _receive_within(receive, seconds: float):
    if hasattr(asyncio, "timeout"):  # Python 3.11+: no extra task per message, unlike wait_for
        async with asyncio.timeout(seconds):
            return await receive()
    return await asyncio.wait_for(receive(), seconds)


async def _answer(send, status: int, message: str) -> None:
    body = json.dumps(ApiError(status, message).body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # the rest of the body is not read: the connection ends here
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Buffer the request body: at most `max_bytes`, all of it within `timeout_s` seconds."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        try:
            declared_bytes = int(declared) if declared is not None else None
        except ValueError:
            declared_bytes = None  # h11 refuses a malformed Content-Length before we see it
        too_large = declared_bytes is not None and declared_bytes > self.max_bytes
        if too_large and declared_bytes > _DRAIN_LIMIT_BYTES:
            return await self._too_large(send, declared_bytes)
        chunks, received = [], 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await _receive_within(receive, max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                promised = f" of the {declared_bytes} bytes its Content-Length promised" if declared_bytes else ""
                return await _answer(
                    send,
                    408,
                    f"The request body did not arrive within {self.timeout_s:g} s (got {received} bytes"
                    f"{promised}): send the whole body at once.",
                )
            if message["type"] == "http.disconnect":
                return
            received += len(message.get("body", b""))
            if not too_large:
                chunks.append(message.get("body", b""))
            if received > self.max_bytes:
                too_large = True
                chunks = []
            if not message.get("more_body", False) or (too_large and received > _DRAIN_LIMIT_BYTES):
                break
        if too_large:
            return await self._too_large(send, declared_bytes)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then wait for the disconnect, as the server would tell it

        await self.app(scope, replay, send)

    async def _too_large(self, send, declared_bytes: int | None) -> None:
        size = declared_bytes if declared_bytes is not None else f"more than {self.max_bytes}"
        await _answer(
            send,
            413,
            f"Request body of {size} bytes exceeds this server's limit of {self.max_bytes} bytes "
            "(--max-request-bytes): send a shorter prompt.",
        )
