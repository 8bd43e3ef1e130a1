"""Adapters at run time: LRU eviction and reload, load/unload endpoints, adapters that do not fit."""

from __future__ import annotations

import shutil
import threading

import pytest

from tests.serve.conftest import ADMIN, PROMPT, Client, offline_generate, start


@pytest.fixture(scope="module")
def expected(base_dir, adapters):
    from tests.tiny import build_tokenizer

    ids = build_tokenizer()(PROMPT)["input_ids"]
    return {name: offline_generate(base_dir, path, ids, 8) for name, path in adapters.items()}


def greedy_text(client, model):
    status, body = client.complete(model, max_tokens=8, temperature=0)
    assert status == 200, body
    return body["choices"][0]["text"]


def test_one_resident_adapter_evicts_and_reloads(base_dir, adapters, expected):
    running = start(base_dir, adapters, max_adapters=1)
    try:
        client, pool = Client(running.url), running.engine.pool
        for model in ["paris", "docs", "paris", "docs"]:
            assert greedy_text(client, model) == expected[model]
            assert (
                pool.is_resident(model) and len([e for e in pool.entries() if pool.is_resident(e.name)]) == 1
            )
        assert pool.evictions >= 4  # adding docs evicted paris, then every switch evicts

        # Concurrent requests to both adapters cannot share a batch with one slot: split, both right.
        results = {}
        barrier = threading.Barrier(2)

        def ask(model):
            barrier.wait()
            results[model] = greedy_text(client, model)

        threads = [threading.Thread(target=ask, args=(m,)) for m in ("paris", "docs")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == {"paris": expected["paris"], "docs": expected["docs"]}
    finally:
        running.stop()


def test_load_and_unload_adapters_at_run_time(base_dir, adapters, expected):
    running = start(base_dir, {"paris": adapters["paris"]}, adapter_roots=(adapters["docs"].parent,))
    try:
        client = Client(running.url)

        def admin(method, path, payload=None):
            return client.call(method, path, payload, ADMIN)

        assert client.complete("docs2")[0] == 404
        status, body = admin("POST", "/v1/adapters", {"name": "docs2", "source": "docs"})
        assert status == 201 and body == {"name": "docs2", "source": "docs", "version": None, "rank": 8}, body
        assert {m["id"] for m in client.call("GET", "/v1/models")[1]["data"]} == {
            "tiny-base",
            "paris",
            "docs2",
        }
        assert greedy_text(client, "docs2") == expected["docs"]
        assert greedy_text(client, "paris") == expected["paris"]

        status, body = admin("POST", "/v1/adapters", {"name": "docs2", "source": "paris"})
        assert status == 409 and "replace" in body["error"]["message"]
        status, body = admin("POST", "/v1/adapters", {"name": "docs2", "source": "paris", "replace": True})
        assert status == 201
        assert greedy_text(client, "docs2") == expected["paris"]

        status, body = admin("POST", "/v1/adapters", {"name": "ghost", "source": "missing"})
        assert status == 400 and "not a folder under any adapter root" in body["error"]["message"]
        status, body = admin("POST", "/v1/adapters", {"name": "tiny-base", "source": "docs"})
        assert status == 400 and "base model" in body["error"]["message"]

        status, body = admin("DELETE", "/v1/adapters/docs2")
        assert status == 200 and body == {"name": "docs2", "deleted": True}
        status, body = client.complete("docs2")
        assert status == 404 and body["error"]["code"] == "model_not_found"
        assert {m["id"] for m in client.call("GET", "/v1/models")[1]["data"]} == {"tiny-base", "paris"}
        assert greedy_text(client, "paris") == expected["paris"]

        # vLLM's route names do the same
        status, body = admin("POST", "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": "docs"})
        assert status == 200 and body["name"] == "d", body
        assert greedy_text(client, "d") == expected["docs"]
        assert admin("POST", "/v1/unload_lora_adapter", {"lora_name": "d"}) == (200, {"name": "d", "deleted": True})
        assert admin("POST", "/v1/unload_lora_adapter", {"lora_name": "d"})[0] == 404
        assert client.complete("d")[0] == 404
    finally:
        running.stop()


def test_an_adapter_that_does_not_fit_the_base_is_refused_and_the_base_is_untouched(
    base_dir, adapters, tmp_path
):
    """A LoRA matrix of the wrong width is caught before peft injects anything into the model."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.tiny import build_tokenizer

    bad = tmp_path / "bad"
    shutil.copytree(adapters["docs"], bad)
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("q_proj.lora_A.weight"))
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] * 2)
    save_file(weights, bad / "adapter_model.safetensors")

    running = start(base_dir, {}, adapter_roots=(tmp_path,))
    try:
        client = Client(running.url)
        status, body = client.call("POST", "/v1/adapters", {"name": "bad", "source": "bad"}, ADMIN)
        assert status == 400 and "does not fit the served base model" in body["error"]["message"], body
        ids = build_tokenizer()(PROMPT)["input_ids"]
        assert greedy_text(client, "tiny-base") == offline_generate(base_dir, None, ids, 8)
        assert client.complete("bad")[0] == 404
    finally:
        running.stop()


def test_admin_endpoints_need_the_token_when_one_is_set(base_dir, adapters):
    running = start(base_dir, {}, admin_token="s3cret", adapter_roots=(adapters["docs"].parent,))
    try:
        client = Client(running.url)
        body = {"name": "docs", "source": "docs"}
        status, answer = client.call("POST", "/v1/adapters", body)
        assert status == 401 and "Bearer" in answer["error"]["message"]
        status, _ = client.call("POST", "/v1/adapters", body, {"Authorization": "Bearer wrong"})
        assert status == 401
        status, _ = client.call("POST", "/v1/adapters", body, {"Authorization": "Bearer s3cret"})
        assert status == 201
        assert client.call("DELETE", "/v1/adapters/docs")[0] == 401
        assert (
            client.call("DELETE", "/v1/adapters/docs", headers={"Authorization": "Bearer s3cret"})[0] == 200
        )
    finally:
        running.stop()
