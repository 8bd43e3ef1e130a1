"""Registry rules and the pyfunc wrapper, on tiny peft adapters (no Prefect, no trainer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest

from data.errors import UserError
from flows import registry


def test_verify_adapter_accepts_a_peft_lora(tiny_adapter):
    config = registry.verify_adapter(tiny_adapter(0))
    assert config["r"] == 4
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}


def test_verify_adapter_rejects_missing_weights(tiny_adapter, tmp_path):
    broken = shutil.copytree(tiny_adapter(0), tmp_path / "broken")
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(registry.AdapterCheckError, match="adapter_model.safetensors"):
        registry.verify_adapter(broken)


def test_verify_adapter_rejects_unloadable_config(tiny_adapter, tmp_path):
    broken = shutil.copytree(tiny_adapter(0), tmp_path / "broken")
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(registry.AdapterCheckError, match="does not load"):
        registry.verify_adapter(broken)


def test_verify_adapter_rejects_modules_to_save(tiny_adapter):
    with pytest.raises(registry.AdapterCheckError, match="modules_to_save|whole modules"):
        registry.verify_adapter(tiny_adapter(1, modules_to_save=["lm_head"]))


def _run(flow_settings, name):
    from flows.settings import ensure_experiment

    experiment_id = ensure_experiment(f"test-{name}", flow_settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name) as run:
        return run.info.run_id


def _greedy_reference(model_dir, adapter_dir, prompt, max_new_tokens):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_registered_adapter_loads_from_champion_alias_and_generates(
    flow_settings, registry_client, tiny_models, tiny_adapter, tmp_path
):
    name = "tiny-pyfunc"
    model_dir, adapter_dir = tiny_models("llama"), tiny_adapter(0)
    run_id = _run(flow_settings, name)
    model_uri = registry.log_adapter_model(run_id, adapter_dir, str(model_dir), tmp_path)
    tags = {"base_model": str(model_dir), "rank": 4, "eval_loss": 2.5, "method": "lora"}
    reg = registry.register_adapter(registry_client, name, model_uri, "fp-1", tags)
    assert reg.created and reg.version == "1"
    decision = registry.promote_if_better(registry_client, name, reg.version, passed=True, eval_loss=2.5)
    assert decision.promoted and decision.reason == "first champion"

    version = registry_client.get_model_version_by_alias(name, "champion")
    assert str(version.version) == "1"
    assert version.tags["rank"] == "4" and version.tags["run_fingerprint"] == "fp-1"
    assert set(_aliases(registry_client, name)) == {"candidate", "champion"}
    # The raw peft directory is a run artifact too (what vLLM loads).
    files = {f.path for f in registry_client.list_artifacts(run_id, registry.ADAPTER_ARTIFACT)}
    assert f"{registry.ADAPTER_ARTIFACT}/adapter_model.safetensors" in files

    # Models from code: the logged model is our source file and the adapter's safetensors, no pickle.
    logged = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "dl")))
    assert not list(logged.rglob("*.pkl")) and (logged / "pyfunc_entry.py").is_file()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in (logged / "MLmodel").read_text()
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    prompt = "The capital of France is"
    outputs = model.predict([prompt, [{"role": "user", "content": "hi"}]], params={"max_new_tokens": 5})
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)
    assert outputs[0] == _greedy_reference(model_dir, adapter_dir, prompt, 5)
    import pandas as pd

    assert model.predict(pd.DataFrame({"prompt": [prompt]}), params={"max_new_tokens": 5}) == outputs[:1]


@pytest.fixture
def model_uri(flow_settings, tiny_adapter, tmp_path):
    """One logged adapter model; the promotion tests register it under several fingerprints."""
    run_id = _run(flow_settings, "rules")
    return registry.log_adapter_model(run_id, tiny_adapter(0), "unused-base", tmp_path)


def _aliases(client, name):
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def _register(client, name, uri, fingerprint, loss):
    reg = registry.register_adapter(client, name, uri, fingerprint, {"eval_loss": loss})
    return reg, registry.promote_if_better(client, name, reg.version, passed=True, eval_loss=loss)


def test_promotion_rules_and_rollback(registry_client, model_uri):
    client, name = registry_client, "tiny-rules"
    _register(client, name, model_uri, "a", 2.0)
    reg2, worse = _register(client, name, model_uri, "b", 2.1)
    assert not worse.promoted and "> champion v1" in worse.reason
    aliases = _aliases(client, name)
    assert aliases["champion"] == "1" and aliases["candidate"] == "2"

    reg3, better = _register(client, name, model_uri, "c", 1.9)
    assert better.promoted and better.previous_champion == "1"
    aliases = _aliases(client, name)
    assert aliases["champion"] == "3" and aliases["previous_champion"] == "1"

    back = registry.rollback(client, name, reason="bad outputs")
    assert back.version == "1"
    aliases = _aliases(client, name)
    assert aliases["champion"] == "1" and "previous_champion" not in aliases
    assert client.get_model_version(name, "3").tags["rolled_back"] == "bad outputs"
    # The rolled-back version is never re-promoted by the gate, only by an operator.
    again = registry.promote_if_better(client, name, "3", passed=True, eval_loss=1.9)
    assert not again.promoted and "rolled back" in again.reason
    with pytest.raises(UserError, match="no previous champion"):
        registry.rollback(client, name)

    forced = registry.promote(client, name, "2", reason="A/B test winner")
    assert forced.promoted and forced.previous_champion == "1"
    assert client.get_model_version(name, "2").tags["promoted_reason"] == "A/B test winner"
    assert registry.rollback(client, name).version == "1"
    with pytest.raises(UserError, match="no version"):
        registry.promote(client, name, "99", reason="typo")


def test_failed_gate_and_duplicates_move_no_alias(registry_client, model_uri):
    client, name = registry_client, "tiny-dupes"
    first, _ = _register(client, name, model_uri, "same", 2.0)
    again = registry.register_adapter(client, name, model_uri, "same", {"eval_loss": 1.0})
    assert not again.created and again.version == first.version
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    other = registry.register_adapter(client, name, model_uri, "other", {"eval_loss": 0.1})
    before = _aliases(client, name)
    assert before == {"candidate": other.version, "champion": first.version}
    regretful = registry.promote_if_better(client, name, other.version, passed=False, eval_loss=0.1)
    assert not regretful.promoted and regretful.reason == "regret gate failed"
    assert _aliases(client, name) == before
