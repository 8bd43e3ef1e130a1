"""Embedded defaults: SQLite + local artifacts under .lowregret, yielding to the user's variables."""

from __future__ import annotations

import os

from flows.settings import apply_environment, ensure_experiment, load_settings


def test_defaults_live_under_dot_lowregret(tmp_path):
    settings = load_settings(tmp_path, environ={})
    assert settings.tracking_uri == f"sqlite:///{tmp_path.resolve()}/.lowregret/mlflow.db"
    assert settings.registry_uri == settings.tracking_uri
    assert settings.artifact_root == (tmp_path.resolve() / ".lowregret" / "mlartifacts").as_uri()
    assert settings.result_storage == tmp_path.resolve() / ".lowregret" / "prefect" / "storage"
    assert settings.prefect_api_url is None


def test_user_variables_win(tmp_path):
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "PREFECT_API_URL": "http://prefect:4200/api",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": "/data/results"}
    settings = load_settings(tmp_path, environ=env)
    assert settings.tracking_uri == settings.registry_uri == "http://mlflow:5000"
    assert settings.prefect_api_url == "http://prefect:4200/api"
    assert str(settings.result_storage) == "/data/results"
    assert load_settings(tmp_path, environ=env | {"MLFLOW_REGISTRY_URI": "sqlite:///r.db"}).registry_uri == "sqlite:///r.db"



def test_apply_environment_keeps_what_is_set(tmp_path, restore_environ):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL",
                "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "PREFECT_RESULTS_LOCAL_STORAGE_PATH"):
        os.environ.pop(var, None)
    os.environ["MLFLOW_REGISTRY_URI"] = "sqlite:///elsewhere.db"
    settings = apply_environment(load_settings(tmp_path))
    assert os.environ["MLFLOW_TRACKING_URI"] == settings.tracking_uri
    assert os.environ["MLFLOW_REGISTRY_URI"] == "sqlite:///elsewhere.db"
    assert os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] == "true"  # no server needed
    assert (tmp_path / ".lowregret").is_dir() and settings.result_storage.is_dir()


def test_experiments_store_artifacts_under_mlartifacts(flow_settings):
    from mlflow.tracking import MlflowClient

    experiment_id = ensure_experiment("lowregret/settings-check", flow_settings)
    assert ensure_experiment("lowregret/settings-check", flow_settings) == experiment_id
    location = MlflowClient(flow_settings.tracking_uri).get_experiment(experiment_id).artifact_location
    assert location == f"{flow_settings.artifact_root}/lowregret/settings-check"
