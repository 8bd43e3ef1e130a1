"""The OpenAI-style request and response shapes: validation with messages that say the fix.

Pure Python (no torch): a request body (already parsed JSON) becomes a `Sampling` plus a prompt,
or an `ApiError` that the server sends as `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

MAX_STOP_STRINGS = 4  # OpenAI's limit for `stop`


class ApiError(Exception):
    """An error a client can fix, sent as an OpenAI-shaped error body with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": "server_error" if self.status >= 500 else "invalid_request_error",
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Sampling:
    """How to continue one prompt (see serving.generation.GenerationRequest)."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    stream: bool


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"`{key}` must be a number, got {type(value).__name__}.", param=key)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ApiError(400, f"`{key}` must be in {bracket}{low}, {high}], got {value}.", param=key)
    return float(value)


def parse_model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(
            400,
            "`model` is required: the name of a served adapter or of the base model (GET /v1/models lists them).",
            param="model",
        )
    return model


def parse_sampling(body: dict, default_max_tokens: int, max_tokens_limit: int) -> Sampling:
    """The sampling fields shared by /v1/completions and /v1/chat/completions."""
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is None:
        max_tokens = min(default_max_tokens, max_tokens_limit)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ApiError(
            400, f"`max_tokens` must be an integer, got {type(max_tokens).__name__}.", param="max_tokens"
        )
    if not 1 <= max_tokens <= max_tokens_limit:
        raise ApiError(
            400,
            f"`max_tokens` must be between 1 and {max_tokens_limit} (this server's --max-new-tokens-limit), "
            f"got {max_tokens}: ask for fewer tokens.",
            param="max_tokens",
        )
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_STRINGS:
        stops = tuple(stop)
    else:
        raise ApiError(
            400, f"`stop` must be a string or a list of at most {MAX_STOP_STRINGS} strings.", param="stop"
        )
    if any(s == "" for s in stops):
        raise ApiError(400, "`stop` strings must not be empty.", param="stop")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(
            400, "Only `n`: 1 is supported; send several requests for several completions.", param="n"
        )
    for unsupported in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
        if body.get(unsupported):  # absent, null, false, 0 and {} all mean "not asked for"
            raise ApiError(
                400, f"`{unsupported}` is not supported by this server; leave it out.", param=unsupported
            )
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "Only `best_of`: 1 is supported; leave it out.", param="best_of")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false.", param="stream")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        stop=stops,
        stream=stream,
    )


def parse_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(
            400, "`prompt` is required and must be a string (one prompt per request).", param="prompt"
        )
    return prompt


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400,
            '`messages` is required: a non-empty list of {"role": ..., "content": ...}.',
            param="messages",
        )
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"`messages[{i}]` must be an object with a string `role`.", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: text parts only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise ApiError(
                    400,
                    f'`messages[{i}].content` parts must all be {{"type": "text", "text": ...}}.',
                    param="messages",
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"`messages[{i}].content` must be a string.", param="messages")
        clean.append({"role": message["role"], "content": content})
    return clean


def completion_body(
    kind: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict:
    """The non-streaming response of /v1/completions (kind "text") or /v1/chat/completions ("chat")."""
    choice: dict = {"index": 0, "finish_reason": finish_reason}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = None
    else:
        choice["text"] = text
        choice["logprobs"] = None
    return {
        "id": new_id(kind),
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chunk_body(
    kind: str,
    request_id: str,
    model: str,
    text: str | None,
    finish_reason: str | None,
    role: str | None = None,
) -> dict:
    """One server-sent event of a streamed response (a chat stream opens with the role alone)."""
    if kind == "chat":
        delta = {"role": role} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
