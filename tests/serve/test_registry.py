"""Serving `NAME@champion` from an MLflow registry in tmp_path, registered with flows.registry."""

from __future__ import annotations

import pytest

from tests.serve.conftest import ADMIN, PROMPT, Client, offline_generate, start

registry = pytest.importorskip("flows.registry", reason="flows.registry (MLflow registry) is not installed")


@pytest.fixture(scope="module")
def registry_home(tmp_path_factory):
    """A working directory whose .lowregret holds the SQLite registry (the flows default)."""
    home = tmp_path_factory.mktemp("registry-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            patch.delenv(var, raising=False)
        yield home


@pytest.fixture(scope="module")
def registered(registry_home, base_dir, adapters):
    """v1 = paris (champion), v2 = docs (candidate) of the registered model `capitals`."""
    import mlflow

    from flows.settings import configure_mlflow, ensure_experiment, load_settings

    settings = load_settings(registry_home)
    configure_mlflow(settings)
    client = registry.client_for(settings)
    experiment = ensure_experiment("serve-test", settings)
    versions = {}
    for i, name in enumerate(["paris", "docs"]):
        with mlflow.start_run(experiment_id=experiment) as run:
            run_id = run.info.run_id
        uri = registry.log_adapter_model(
            run_id, adapters[name], str(base_dir), registry_home / f"scratch-{name}"
        )
        tags = {"base_model": str(base_dir), "rank": 8, "targets": "all"}
        versions[name] = registry.register_adapter(client, "capitals", uri, f"fingerprint-{i}", tags).version
    registry.promote(client, "capitals", versions["paris"], "test")
    return versions


def test_champion_and_version_from_the_registry_answer_like_their_adapters(
    registered, registry_home, base_dir, adapters
):
    from serving.adapters import describe_adapter
    from tests.tiny import build_tokenizer

    entry = describe_adapter("capitals", "capitals@champion")
    assert entry.version == registered["paris"] and entry.base_model == str(base_dir) and entry.rank == 8
    assert (
        registry_home / ".lowregret" / "serve-cache" / "capitals" / entry.version / "adapter_config.json"
    ).is_file()

    ids = build_tokenizer()(PROMPT)["input_ids"]
    running = start(base_dir, {})
    try:
        client = Client(running.url)
        running.engine.pool.add(entry)
        status, body = client.call(
            "POST", "/v1/adapters", {"name": "v2", "source": f"capitals@{registered['docs']}"}, ADMIN
        )
        assert status == 201 and body["version"] == registered["docs"], body
        for model, adapter in (("capitals", "paris"), ("v2", "docs")):
            status, body = client.complete(model, max_tokens=8, temperature=0)
            assert status == 200
            assert body["choices"][0]["text"] == offline_generate(base_dir, adapters[adapter], ids, 8)
        status, body = client.call("POST", "/v1/adapters", {"name": "x", "source": "capitals@nosuchalias"}, ADMIN)
        assert status == 400 and "capitals@nosuchalias" in body["error"]["message"]
        assert str(registry_home) not in body["error"]["message"], "an absolute path in an answer"
        models = client.call("GET", "/v1/models")[1]["data"]
        assert {m["id"]: m["lora"]["source"] for m in models if m["lora"]} == {
            "capitals": "capitals@champion",
            "v2": f"capitals@{registered['docs']}",
        }
    finally:
        running.stop()


def test_export_from_the_registry_uses_the_registered_name_and_base(registered, base_dir, tmp_path, capsys):
    from flows.cli import main
    from serving.export import export_vllm

    assert main(["export", "--vllm", f"capitals@{registered['docs']}", str(tmp_path / "cli")]) == 0
    assert (
        capsys.readouterr()
        .out.strip()
        .splitlines()[-1]
        .endswith(f"--lora-modules capitals={tmp_path / 'cli'}")
    )
    result = export_vllm("capitals@champion", tmp_path / "vllm")
    assert result.name == "capitals" and result.base == str(base_dir) and result.max_lora_rank == 8
    assert result.command.startswith(
        f"vllm serve {base_dir} --enable-lora --max-lora-rank 8 --lora-modules capitals="
    )
