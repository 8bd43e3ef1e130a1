"""The server over HTTP on loopback: adapters answer as peft does offline, mixed batches, limits."""

from __future__ import annotations

import json
import threading

import pytest

from tests.serve.conftest import ADMIN, PROMPT, Client, chat_prompt_ids, offline_generate, start

N_TOKENS = 10


@pytest.fixture(scope="module")
def server(base_dir, adapters):
    running = start(base_dir, adapters, max_request_bytes=4096, max_new_tokens_limit=64)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url)


@pytest.fixture(scope="module")
def expected(base_dir, adapters):
    """Greedy continuations of PROMPT from peft outside the server, per served model name."""
    from tests.tiny import build_tokenizer

    ids = build_tokenizer()(PROMPT)["input_ids"]
    texts = {name: offline_generate(base_dir, path, ids, N_TOKENS) for name, path in adapters.items()}
    texts["tiny-base"] = offline_generate(base_dir, None, ids, N_TOKENS)
    return texts


def greedy(client, model, **fields):
    status, body = client.complete(model, **{"max_tokens": N_TOKENS, "temperature": 0, **fields})
    assert status == 200, body
    return body


def test_adapters_answer_differently_and_as_peft_does_offline(client, expected):
    assert len(set(expected.values())) == 3, f"the test adapters must differ: {expected}"
    for model, text in expected.items():
        body = greedy(client, model)
        assert body["choices"][0]["text"] == text
        assert body["model"] == model
        assert body["usage"] == {
            "prompt_tokens": 16,
            "completion_tokens": N_TOKENS,
            "total_tokens": 16 + N_TOKENS,
        }


def test_concurrent_requests_share_mixed_batches_and_each_gets_its_answer(server, client, expected):
    """Greedy rows stay exact next to rows of other adapters and next to a sampled row."""
    models = ["paris", "docs", "tiny-base"] * 2
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(models) + 1)

    def ask(i, model):
        barrier.wait()
        results[i] = greedy(client, model)["choices"][0]["text"]

    def ask_sampled():
        barrier.wait()
        status, body = client.complete("paris", max_tokens=N_TOKENS, temperature=1.0, top_p=0.95)
        results["sampled"] = status

    mixed_before = server.engine.stats.mixed_batches
    threads = [threading.Thread(target=ask, args=(i, m)) for i, m in enumerate(models)]
    threads.append(threading.Thread(target=ask_sampled))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {i: results.get(i) for i in range(len(models))} == {i: expected[m] for i, m in enumerate(models)}
    assert results["sampled"] == 200
    assert server.engine.stats.mixed_batches > mixed_before, "no batch mixed two adapters"


def test_chat_goes_through_the_chat_template(client, base_dir, adapters):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = chat_prompt_ids(messages)
    status, body = client.call(
        "POST",
        "/v1/chat/completions",
        {"model": "docs", "messages": messages, "max_tokens": 6, "temperature": 0},
    )
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": offline_generate(base_dir, adapters["docs"], ids, 6),
    }
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_stop_string_and_max_tokens(client, expected):
    full = expected["paris"]
    assert "." in full, full
    body = greedy(client, "paris", stop=["."])
    assert body["choices"][0] == {
        "index": 0,
        "text": full[: full.index(".")],
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert body["usage"]["completion_tokens"] < N_TOKENS
    status, body = client.complete("paris", max_tokens=3, temperature=0)
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3


def test_sampling_with_a_tiny_top_p_keeps_only_the_best_token(client, expected):
    """top_p -> 0 leaves one candidate per step, so sampling must reproduce greedy decoding."""
    body = greedy(client, "docs", **{"temperature": 1.5, "top_p": 1e-6})
    assert body["choices"][0]["text"] == expected["docs"]
    status, body = client.complete("docs", max_tokens=N_TOKENS, temperature=1.0, top_p=0.9)
    assert status == 200 and 1 <= body["usage"]["completion_tokens"] <= N_TOKENS


def test_streaming_sends_the_same_text_in_pieces(client, expected):
    payload = {"model": "paris", "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "stream": True}
    status, data, headers = client.raw(
        "POST", "/v1/completions", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in data.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected["paris"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == N_TOKENS


def test_streaming_never_leaks_a_stop_string(client, expected):
    """A multi-token stop string: its first piece (".") must be held back until " The" settles it."""
    full = expected["paris"]
    assert ". The" in full, full
    payload = {
        "model": "paris",
        "prompt": PROMPT,
        "max_tokens": N_TOKENS,
        "temperature": 0,
        "stream": True,
        "stop": ". The",
    }
    status, data, _ = client.raw(
        "POST", "/v1/completions", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    chunks = [
        json.loads(e.removeprefix("data: ")) for e in data.decode().split("\n\n") if e and e != "data: [DONE]"
    ]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[: full.index(". The")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_models_lists_base_and_adapters(client):
    status, body = client.call("GET", "/v1/models")
    assert status == 200
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {"tiny-base", "paris", "docs"}
    assert by_id["paris"]["parent"] == "tiny-base" and by_id["paris"]["lora"]["rank"] == 8
    status, health = client.call("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert client.call("GET", "/ready") == (200, {"status": "ready"})
    status, spec = client.call("GET", "/openapi.json")
    assert status == 200 and {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(spec["paths"])
    assert client.raw("GET", "/docs")[0] == 200
    status, text, headers = client.raw("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for name in ("lowregret_http_requests_total", "lowregret_prompt_tokens_total", "lowregret_adapters_loaded 2.0",
                 "lowregret_requests_waiting 0.0", "lowregret_http_request_duration_seconds_bucket"):
        assert name.encode() in text, name


BAD_REQUESTS = [
    # (what, method, path, raw body, extra headers, status, words the message must contain)
    ("unknown adapter", "POST", "/v1/completions", b'{"model": "nope", "prompt": "hi"}', {}, 404, "nope"),
    (
        "malformed JSON",
        "POST",
        "/v1/completions",
        b'{"model": "paris", "prompt": ',
        {},
        400,
        "not valid JSON",
    ),
    ("not an object", "POST", "/v1/completions", b'["paris"]', {}, 400, "JSON object"),
    (
        "NaN",
        "POST",
        "/v1/completions",
        b'{"model": "paris", "prompt": "a", "temperature": NaN}',
        {},
        400,
        "finite number",
    ),
    (
        "oversized",
        "POST",
        "/v1/completions",
        b'{"model": "paris", "prompt": "' + b"x" * 5000 + b'"}',
        {},
        413,
        "4096",
    ),
    ("missing model", "POST", "/v1/completions", b'{"prompt": "hi"}', {}, 400, "`model` is required"),
    ("missing prompt", "POST", "/v1/completions", b'{"model": "paris"}', {}, 400, "`prompt` is required"),
    (
        "missing messages",
        "POST",
        "/v1/chat/completions",
        b'{"model": "paris"}',
        {},
        400,
        "`messages` is required",
    ),
    (
        "bad max_tokens type",
        "POST",
        "/v1/completions",
        b'{"model": "paris", "prompt": "a", "max_tokens": "ten"}',
        {},
        400,
        "integer",
    ),
    (
        "max_tokens over limit",
        "POST",
        "/v1/completions",
        b'{"model": "paris", "prompt": "a", "max_tokens": 65}',
        {},
        400,
        "between 1 and 64",
    ),
    (
        "temperature range",
        "POST",
        "/v1/completions",
        b'{"model": "paris", "prompt": "a", "temperature": 3}',
        {},
        400,
        "temperature",
    ),
    ("bad stop", "POST", "/v1/completions", b'{"model": "paris", "prompt": "a", "stop": 5}', {}, 400, "stop"),
    ("n > 1", "POST", "/v1/completions", b'{"model": "paris", "prompt": "a", "n": 2}', {}, 400, "n"),
    ("unknown route", "POST", "/v1/embeddings", b"{}", {}, 404, "No route"),
    ("delete unknown adapter", "DELETE", "/v1/adapters/nope", None, ADMIN, 404, "nope"),
    ("NUL byte in an adapter source", "POST", "/v1/adapters", b'{"name": "x", "source": "a\\u0000b"}', ADMIN, 400,
     "source"),
    ("control character in a vLLM lora_path", "POST", "/v1/load_lora_adapter",
     b'{"lora_name": "x", "lora_path": "a\\nb"}', ADMIN, 400, "lora_path"),
]


def test_a_vanishing_temperature_is_greedy_not_a_server_error(client, expected):
    """temperature 1e-300 would divide the logits into inf: below vLLM's 1e-5 it is greedy."""
    body = greedy(client, "docs", temperature=1e-300)
    assert body["choices"][0]["text"] == expected["docs"]


@pytest.mark.parametrize(
    "what,method,path,body,headers,status,words", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS]
)
def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(
    client, expected, what, method, path, body, headers, status, words
):
    got_status, data, _ = client.raw(method, path, body, {"Content-Type": "application/json", **headers})
    assert got_status == status, data
    error = json.loads(data)["error"]
    assert words in error["message"] and error["type"]
    assert greedy(client, "docs")["choices"][0]["text"] == expected["docs"]


def test_chat_streaming_opens_with_the_role_then_sends_the_same_content(client):
    request = {
        "model": "docs",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    status, whole = client.call("POST", "/v1/chat/completions", request)
    assert status == 200
    payload = json.dumps({**request, "stream": True}).encode()
    status, data, _ = client.raw(
        "POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"}
    )
    chunks = [
        json.loads(e.removeprefix("data: ")) for e in data.decode().split("\n\n") if e and e != "data: [DONE]"
    ]
    assert status == 200 and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
