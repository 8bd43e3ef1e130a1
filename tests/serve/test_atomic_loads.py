"""A failed adapter load leaves the served set and the model exactly as they were: refused files
(a pickle, a corrupt safetensors) before the model changes, and a peft load that fails half-way
undone."""

from __future__ import annotations

import shutil

import pytest

from tests.serve.conftest import ADMIN, PROMPT, Client, start


@pytest.fixture(scope="module")
def root(adapters, tmp_path_factory):
    """Good and broken adapters side by side under one adapter root."""
    import torch
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("atomic")
    shutil.copytree(adapters["docs"], root / "docs")
    pickled = root / "pickled"  # what older peft versions wrote: adapter_model.bin, a pickle
    pickled.mkdir()
    shutil.copy(adapters["docs"] / "adapter_config.json", pickled)
    torch.save(load_file(adapters["docs"] / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    truncated = shutil.copytree(adapters["docs"], root / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = shutil.copytree(adapters["docs"], root / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    return root


def snapshot(running) -> dict:
    """What must not change: served names, resident adapters, the model's modules and every weight,
    and the answers."""
    pool, client = running.engine.pool, Client(running.url)
    with pool.lock:
        weights = sorted((name, float(p.detach().double().sum())) for name, p in pool.model.named_parameters())
        modules = sorted(name for name, _ in pool.model.named_modules())
    answers = {}
    for model in ["tiny-base", *(e.name for e in pool.entries())]:
        status, body = client.complete(model, max_tokens=6, temperature=0)
        assert status == 200, body
        answers[model] = body["choices"][0]["text"]
    return {
        "served": sorted(m["id"] for m in client.call("GET", "/v1/models")[1]["data"]),
        "resident": sorted(pool.resident_names()),
        "weights": weights,
        "modules": modules,
        "answers": answers,
    }


def load(running, name, source, replace=False):
    status, body = Client(running.url).call(
        "POST", "/v1/adapters", {"name": name, "source": source, "replace": replace}, ADMIN
    )
    return status, body["error"]["message"] if status >= 400 else body


@pytest.mark.parametrize("with_adapter", [False, True], ids=["bare-base", "one-adapter-loaded"])
def test_a_failed_load_leaves_the_served_set_and_the_model_as_they_were(
    base_dir, adapters, root, monkeypatch, with_adapter
):
    import peft.peft_model

    running = start(base_dir, {"paris": adapters["paris"]} if with_adapter else {}, adapter_roots=(root,))
    try:
        before = snapshot(running)
        for source, words in [
            ("pickled", "adapter_model.bin, a pickle"),
            ("truncated", "not a readable safetensors file"),
            ("garbage", "not a readable safetensors file"),
        ]:
            status, message = load(running, "new", source)
            assert status == 400 and words in message, (source, message)
            assert snapshot(running) == before, source

        # peft itself fails once, after it has wrapped the layers and registered the adapter (the
        # undo then reloads the resident adapters with the real function)
        real, failures = peft.peft_model.set_peft_model_state_dict, []

        def broken_once(*args, **kwargs):
            if not failures:
                failures.append(kwargs.get("adapter_name"))
                raise RuntimeError("disk read error while loading the weights")
            return real(*args, **kwargs)

        monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", broken_once)
        status, message = load(running, "new", "docs")
        assert status == 400 and "disk read error" in message, message
        monkeypatch.undo()
        assert not any(failures[0] in name for name in snapshot(running)["modules"])
        assert snapshot(running) == before
        if with_adapter:  # replacing a served adapter with a broken one keeps the old one serving
            status, message = load(running, "paris", "truncated", replace=True)
            assert status == 400
            assert snapshot(running) == before

        status, body = load(running, "new", "docs")  # the same pool still loads a good adapter
        assert status == 201, body
        assert Client(running.url).complete("new", prompt=PROMPT, max_tokens=4, temperature=0)[0] == 200
    finally:
        running.stop()
