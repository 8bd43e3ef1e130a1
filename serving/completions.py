"""The OpenAI generation routes: /v1/completions and /v1/chat/completions, streamed or not.

A handler validates (pydantic, serving.protocol), tokenizes, queues the request on the engine and
awaits its future: the event loop never waits for the model. Streamed text comes from the
generation thread through `call_soon_threadsafe` into an asyncio queue, and leaves as server-sent
events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse

from data.errors import UserError
from serving.engine import Engine
from serving.metrics import ServerMetrics
from serving.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
)
from trainer.generation import GenerationRequest, GenerationResult

_DONE = object()  # end of a stream's pieces


GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS


def completions_router(
    engine: Engine,
    metrics: ServerMetrics,
    error_response: Callable[[ApiError], JSONResponse],
    max_new_tokens_limit: int,
    request_timeout_s: float,
) -> APIRouter:
    """The generation routes over `engine`.

    Args:
        engine: the base model, its adapter pool and its generation thread.
        metrics: where token counts go.
        error_response: how an error becomes an answer (used for errors inside a stream).
        max_new_tokens_limit: the largest `max_tokens` a request may ask for.
        request_timeout_s: a request without an answer after this long gets 503.
    """
    router = APIRouter(tags=["openai"])

    def prompt_ids_for(kind: str, body) -> list[int]:
        renderer = engine.renderer
        if kind == "text":
            ids = renderer.prompt(body.prompt)
        else:
            if not renderer.has_chat_template:
                raise ApiError(
                    400, f"The base model {engine.base_name!r} has no chat template: use /v1/completions."
                )
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                ids = renderer.prompt(messages, at="The messages")
            except UserError as exc:  # the template rejected them (e.g. a role it does not know)
                raise ApiError(400, str(exc), param="messages") from None
        if not ids:
            raise ApiError(400, "The prompt is empty after tokenisation: send some text.", param="prompt")
        return ids

    def generation_request(kind: str, body) -> GenerationRequest:
        adapter = engine.adapter_for(body.model)
        limit = max_new_tokens_limit
        max_tokens = body.max_tokens_or(min(COMPLETIONS_DEFAULT_MAX_TOKENS if kind == "text" else limit, limit))
        if not 1 <= max_tokens <= limit:
            raise ApiError(
                400,
                f"`max_tokens` must be between 1 and {limit} (this server's --max-new-tokens-limit), "
                f"got {max_tokens}: ask for fewer tokens.",
                param="max_tokens",
            )
        prompt_ids = prompt_ids_for(kind, body)
        if engine.max_context and len(prompt_ids) + max_tokens > engine.max_context:
            raise ApiError(
                400,
                f"Prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {engine.max_context} tokens: shorten the prompt or lower max_tokens.",
                param="max_tokens",
            )
        return GenerationRequest(
            prompt_ids=prompt_ids,
            adapter=adapter,
            max_tokens=max_tokens,
            # Below GREEDY_BELOW a temperature is greedy (vLLM's rule): dividing logits by 1e-300 overflows.
            temperature=1.0 if body.temperature is None else (
                0.0 if body.temperature < GREEDY_BELOW else body.temperature),
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stops,
        )

    def count_tokens(result: GenerationResult) -> None:
        metrics.prompt_tokens.inc(result.prompt_tokens)
        metrics.generation_tokens.inc(result.completion_tokens)

    async def complete(kind: str, body):
        request = generation_request(kind, body)
        if body.stream:
            return stream(kind, body.model, request)
        future = asyncio.wrap_future(engine.submit(request))
        try:
            result = await asyncio.wait_for(future, request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                503, f"No answer within {request_timeout_s:.0f} s: the server is overloaded, retry later."
            ) from None
        count_tokens(result)
        usage = Usage.of(result.prompt_tokens, result.completion_tokens)
        if kind == "text":
            choice = CompletionChoice(text=result.text, finish_reason=result.finish_reason)
            answer = CompletionResponse(id=new_id("text"), model=body.model, choices=[choice], usage=usage)
        else:
            choice = ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)
            answer = ChatCompletionResponse(id=new_id("chat"), model=body.model, choices=[choice], usage=usage)
        # Serialised here, once: FastAPI would dump, re-validate and dump again a model it is handed.
        return Response(answer.model_dump_json(), media_type="application/json")

    def stream(kind: str, model: str, request: GenerationRequest) -> StreamingResponse:
        """Server-sent events, OpenAI style: one chunk per new piece of text, then [DONE]. The request
        is queued before the answer starts, so a full queue still answers 429."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:  # called on the generation thread
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody listens any more
                pass

        request.on_text = put
        job = engine.submit(request)
        job.add_done_callback(lambda _: put(_DONE))
        request_id = new_id(kind)

        def chunk(text: str | None, finish_reason: str | None = None, usage: Usage | None = None, role=None):
            if kind == "chat":
                delta = ChatDelta(role=role, content=text)
                event = ChatCompletionChunk(
                    id=request_id, model=model, choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)],
                    usage=usage,
                )  # fmt: skip
            else:
                choice = CompletionChoice(text=text or "", finish_reason=finish_reason)
                event = CompletionResponse(id=request_id, model=model, choices=[choice], usage=usage)
            return b"data: " + event.model_dump_json().encode() + b"\n\n"

        async def events():
            try:
                if kind == "chat":
                    yield chunk(None, role="assistant")
                deadline = loop.time() + request_timeout_s
                while (item := await asyncio.wait_for(pieces.get(), max(0.0, deadline - loop.time()))) is not _DONE:
                    yield chunk(item)
                if job.exception() is None:
                    result = job.result()
                    count_tokens(result)
                    yield chunk(None, result.finish_reason, Usage.of(result.prompt_tokens, result.completion_tokens))
                else:
                    error = job.exception()
                    failed = ApiError(500, f"Generation failed: {type(error).__name__}: {error}")
                    yield b"data: " + error_response(failed).body + b"\n\n"
                yield b"data: [DONE]\n\n"
            except asyncio.TimeoutError:
                late = ApiError(503, f"No answer within {request_timeout_s:.0f} s: the server is overloaded.")
                yield b"data: " + error_response(late).body + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                job.cancel()  # a client gone before its batch started frees its place in the queue

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.post("/v1/completions", response_model=CompletionResponse, tags=["openai"])
    async def completions(body: CompletionRequest):
        """OpenAI completions; `model` picks the adapter. `stream: true` answers with SSE chunks."""
        return await complete("text", body)

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest):
        """OpenAI chat completions through the base tokenizer's chat template."""
        return await complete("chat", body)

    return router
