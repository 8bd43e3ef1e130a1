"""The OpenAI request and response shapes, as pydantic models (FastAPI validates and documents them).

Requests accept the fields OpenAI's clients send; those this server cannot honour (`n` > 1,
`logprobs`, tools, ...) are refused with a message that says so rather than silently ignored.
Pure Python (no torch).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_serializer,
)

MAX_STOP_STRINGS = 4  # OpenAI's limit for `stop`
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
_UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias")


class ApiError(Exception):
    """An error sent as OpenAI's `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code)).model_dump()


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# --- requests --------------------------------------------------------------------------------------


class _Sampling(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")

    model: str = Field(min_length=1, description="a served adapter's name, or the base model's")
    max_tokens: StrictInt | None = Field(None, description="new tokens at most (server limit applies)")
    max_completion_tokens: StrictInt | None = Field(None, description="OpenAI's newer name for max_tokens")
    temperature: StrictFloat | None = Field(None, ge=0, le=2, description="0 is greedy; default 1")
    top_p: StrictFloat | None = Field(None, gt=0, le=1, description="nucleus mass; default 1")
    seed: StrictInt | None = Field(None, ge=0, lt=2**63, description="the same seed, prompt and settings give the "
                                   "same sampled completion, whatever else is in its batch")
    stop: str | list[str] | None = Field(None, description=f"a string or at most {MAX_STOP_STRINGS} strings")
    stream: StrictBool | None = False
    stream_options: dict[str, Any] | None = Field(None, description="accepted; usage is always in the last chunk")
    n: StrictInt | None = 1
    best_of: StrictInt | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    suffix: Any = None
    tools: Any = None
    functions: Any = None
    logit_bias: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > MAX_STOP_STRINGS or any(s == "" for s in stops)):
            raise ValueError(f"`stop` must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings")
        return stop

    @field_validator("n", "best_of")
    @classmethod
    def _one(cls, value, info):
        if value not in (None, 1):
            raise ValueError(f"only `{info.field_name}`: 1 is supported; send several requests for several completions")
        return value

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, value, info):
        if value:  # absent, null, false, 0 and {} all mean "not asked for"
            raise ValueError(f"`{info.field_name}` is not supported by this server; leave it out")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else ((self.stop,) if isinstance(self.stop, str) else tuple(self.stop))

    def max_tokens_or(self, default: int) -> int:
        asked = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        return default if asked is None else asked


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="one prompt per request")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("`prompt` must be one string (one prompt per request)")
            return prompt[0]
        return prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


# --- responses -------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class _Answer(BaseModel):
    """What every response and streamed chunk starts with."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(_Answer):
    """Also each streamed chunk of /v1/completions (OpenAI uses one object type for both)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletionResponse(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class LoraInfo(BaseModel):
    rank: int
    source: str = Field(description="registry reference, or the folder relative to its --adapter-root (or the working directory)")
    version: str | None
    resident: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lowregret"
    parent: str | None = None
    root: str | None = None
    lora: LoraInfo | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(kind: Literal["text", "chat"]) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
