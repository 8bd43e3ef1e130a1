"""The official `openai` Python client, unmodified, against `lowregret serve`: the adapter is chosen
by `model`, and answers equal peft's offline output."""

from __future__ import annotations

import pytest

from tests.serve.conftest import PROMPT, chat_prompt_ids, offline_generate, start

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")

N_TOKENS = 8


@pytest.fixture(scope="module")
def server(base_dir, adapters):
    running = start(base_dir, adapters)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)


def test_models_completions_and_streaming(client, base_dir, adapters):
    from tests.tiny import build_tokenizer

    assert {m.id for m in client.models.list()} == {"tiny-base", "paris", "docs"}
    ids = build_tokenizer()(PROMPT)["input_ids"]
    for model in ("paris", "docs"):
        expected = offline_generate(base_dir, adapters[model], ids, N_TOKENS)
        answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=N_TOKENS, temperature=0)
        assert answer.choices[0].text == expected and answer.model == model
        assert answer.usage.completion_tokens == N_TOKENS and answer.usage.prompt_tokens == len(ids)
        pieces = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=N_TOKENS, temperature=0, stream=True
        )
        assert "".join(chunk.choices[0].text for chunk in pieces) == expected


def test_chat_and_chat_streaming(client, base_dir, adapters):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = chat_prompt_ids(messages)
    expected = offline_generate(base_dir, adapters["docs"], ids, 6)
    answer = client.chat.completions.create(model="docs", messages=messages, max_tokens=6, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected
    stream = client.chat.completions.create(
        model="docs", messages=messages, max_completion_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_errors_arrive_as_the_client_s_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="paris", prompt=PROMPT, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="`n`"):
        client.completions.create(model="paris", prompt=PROMPT, max_tokens=2, n=2)
