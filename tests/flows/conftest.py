"""Fixtures for the flow tests: one Prefect test server per session, MLflow SQLite in tmp_path,
tiny peft adapters made with peft directly."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_user_stores(monkeypatch):
    """The flows read MLFLOW_* from the environment: a developer's own must not leak into tests."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_RESULTS_LOCAL_STORAGE_PATH"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def restore_environ():
    """The CLI handlers export their defaults into os.environ; put it back after each test."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def flow_settings(tmp_path_factory):
    """FlowSettings rooted in a temporary working directory; MLflow's fluent API points there."""
    from flows.settings import configure_mlflow, load_settings

    settings = load_settings(tmp_path_factory.mktemp("lowregret-work"), environ={})
    configure_mlflow(settings)
    return settings


@pytest.fixture(scope="session")
def registry_client(flow_settings):
    from flows.registry import client_for

    return client_for(flow_settings)


def make_adapter(model_dir: Path, out: Path, seed: int = 0, **lora_kwargs) -> Path:
    """Save a rank-4 LoRA adapter with random (non-zero) B on the tiny model at `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **lora_kwargs)
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tiny_models, tmp_path_factory):
    """Factory: tiny_adapter(seed) -> a saved adapter directory on the tiny llama."""
    root = tmp_path_factory.mktemp("adapters")
    return lambda seed=0, **kw: make_adapter(tiny_models("llama"), root / f"adapter-{seed}-{len(kw)}", seed, **kw)


@pytest.fixture(scope="session")
def prefect_harness(flow_settings):
    """One Prefect test server for the whole session (starting one takes ~30 s on 2 cores)."""
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.settings import prefect_overrides

    # Telemetry writes race the first requests on the server's SQLite ("database is locked" noise).
    with temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=180), prefect_overrides(flow_settings):
            yield
