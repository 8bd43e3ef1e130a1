"""The pipeline flow end to end on a tiny llama: real trainer, evaluation, planner, Prefect (test
server) and MLflow (SQLite in tmp_path). The tests share one registered model and run in order:
first run → PASS, champion; re-run → cached baseline, nothing new, exit 0; regretful run → not
PASS, exit 1 or 3, no alias moves; seed replicates; failing run → registry untouched."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import mlflow
import pytest

from data.errors import UserError
from flows.config import load_pipeline_config

NAME = "tiny-pipeline"
pytestmark = pytest.mark.slow


def tiny_overrides(model_dir, **extra) -> list[str]:
    """A pipeline that trains in seconds: 6 steps of 4 × 64 tokens on 64 synthetic facts."""
    options = {"name": NAME, "model": str(model_dir), "dataset": "builtin:facts?n_facts=64", "rank": 4,
               "lora_lr": 1e-3, "full_lr": 1e-4, "threshold": 1.0, "info_method": "lzma",
               "train.max_steps": 6, "train.batch_size": 4, "train.max_length": 64, "train.eval_points": 3,
               "train.eval_max_examples": 16} | extra
    return [f"{key}={value}" for key, value in options.items()]


@pytest.fixture
def train_calls(monkeypatch):
    """Counts trainer.loop.train calls in this process by method (the tasks call `trainer.launch.run`)."""
    import trainer.loop
    from trainer.loop import train

    calls = collections.Counter()

    def counting(config, *args, **kwargs):
        calls[config.method] += 1
        return train(config, *args, **kwargs)

    monkeypatch.setattr(trainer.loop, "train", counting)
    return calls



@pytest.fixture
def run_pipeline(prefect_harness, flow_settings):
    from flows.pipeline import pipeline

    def run(model_dir, **extra):
        return pipeline(load_pipeline_config(None, tiny_overrides(model_dir, **extra)),
                        workdir=str(flow_settings.home.parent))

    return run


def _versions(client):
    return sorted(int(v.version) for v in client.search_model_versions(f"name='{NAME}'"))


def _aliases(client):
    return {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()}


def _count_reads(monkeypatch) -> collections.Counter:
    """Counts the rows read from the dataset and the rows tokenized, wherever a pipeline step does it."""
    import data.token_cache
    import planner.profile
    from data.render import Renderer

    counts = collections.Counter()
    for module in (data.token_cache, planner.profile):
        def reading(*args, _real=module.load_rows, **kwargs):
            counts["reads"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "load_rows", reading)
    examples = Renderer.examples

    def tokenizing(self, rows, *args, **kwargs):
        counts["tokenized_rows"] += len(rows)
        return examples(self, rows, *args, **kwargs)

    monkeypatch.setattr(Renderer, "examples", tokenizing)
    return counts


def test_first_run_registers_and_promotes_a_champion(run_pipeline, tiny_models, train_calls, registry_client,
                                                     monkeypatch, tmp_path):
    monkeypatch.setenv("LOWREGRET_TOKEN_CACHE", str(tmp_path / "token-cache"))  # nothing tokenized yet
    counts = _count_reads(monkeypatch)
    summary = run_pipeline(tiny_models("llama"))

    assert train_calls == {"full": 1, "lora": 1}
    # The data is read and tokenized once for the whole pipeline (check, plan, both runs): the checked,
    # tokenized dataset in the token cache is what every later step opens.
    assert counts == {"reads": 1, "tokenized_rows": summary["dataset"]["examples"]}
    assert not (Path(summary["lora"]["output_dir"]).parent / "registry-scratch").exists()  # removed after logging
    assert summary["comparison"]["verdict"] == "PASS" and not summary["baseline_cached"]
    comparison = summary["comparison"]
    assert comparison["regret_low"] <= comparison["regret_nats"] <= comparison["regret_high"]
    assert comparison["regret_high"] <= comparison["allowed_regret_nats"]
    assert summary["registration"] == {"name": NAME, "version": "1", "created": True}
    assert summary["promotion"]["promoted"] and summary["promotion"]["reason"] == "first champion"
    assert _aliases(registry_client) == {"candidate": "1", "champion": "1"}

    version = registry_client.get_model_version(NAME, "1")
    tags = version.tags
    assert tags["base_model"] == str(tiny_models("llama")) and tags["rank"] == "4" and tags["method"] == "lora"
    assert tags["targets"] == "all" and tags["plan_verdict"] == summary["plan"]["verdict"]
    assert tags["dataset_fingerprint"] == summary["dataset"]["fingerprint"]
    assert float(tags["eval_loss"]) == pytest.approx(summary["lora"]["final_eval_loss"])
    assert float(tags["regret"]) == pytest.approx(summary["comparison"]["regret_nats"])
    assert float(tags["relative_regret"]) == pytest.approx(summary["comparison"]["regret_relative"])
    assert tags["run_fingerprint"] == summary["run_fingerprint"] and tags["verdict"] == "PASS"
    from flows.registry import list_versions  # `lowregret models` reads the tags this registration wrote

    [row] = list_versions(registry_client, NAME)
    assert row.verdict == "PASS" and row.regret == pytest.approx(comparison["regret_nats"])
    assert row.regret_ci == pytest.approx((comparison["regret_low"], comparison["regret_high"]))
    description = version.description
    assert description.startswith(f"PASS: regret {comparison['regret_nats']:+.4f} nats/token, 95% interval")
    assert "LoRA r=4 lr=0.001 vs FullFT lr=0.0001, 6 steps x batch 4" in description
    assert "builtin:facts?n_facts=64" in description and "held-out examples" in description

    # The version's run is the nested "lora" run: its eval curve is logged with step=.
    run = registry_client.get_run(version.run_id)
    assert run.data.tags["mlflow.parentRunId"] == summary["mlflow"]["parent_run_id"]
    assert run.info.run_name == f"{NAME} lora r=4 lr=0.001 seed=0"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "builtin:facts?n_facts=64"
    assert dataset.dataset.digest == summary["dataset"]["fingerprint"]
    history = registry_client.get_metric_history(version.run_id, "eval_loss")
    curve = json.loads(Path(summary["lora"]["curves_path"]).read_text())["eval"]
    assert [(m.step, m.value) for m in history] == [(step, pytest.approx(loss)) for step, loss in curve]
    assert history[0].step == 0 and history[-1].step == 6
    assert history[-1].value == pytest.approx(summary["lora"]["final_eval_loss"])
    parent = registry_client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["regret_nats"] == pytest.approx(
        summary["comparison"]["regret_nats"])
    assert parent.data.tags["verdict"] == "PASS" and parent.info.run_name == f"{NAME} pipeline"
    assert parent.data.metrics["regret_high"] == pytest.approx(comparison["regret_high"])
    assert _latest_flow_run_tags() >= {"verdict:PASS"}
    artifacts = {f.path for f in registry_client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "curves.png"} <= artifacts

    champion = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    outputs = champion.predict(["The capital of France is"], params={"max_new_tokens": 4})
    assert len(outputs) == 1 and isinstance(outputs[0], str)
    assert champion.input_example[0][0]["role"] == "user"
    assert [p.name for p in champion.metadata.signature.params] == ["max_new_tokens", "temperature", "top_p"]


def _latest_flow_run_tags() -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
    return set(run.tags)


def _cli_pipeline(flow_settings, model_dir, **extra) -> tuple[int, dict]:
    """`lowregret pipeline` through the CLI: its exit code and the summary it wrote."""
    from flows.cli import main

    code = main(["pipeline", "--workdir", str(flow_settings.home.parent), *tiny_overrides(model_dir, **extra)])
    return code, json.loads((flow_settings.reports_dir / NAME / "summary.json").read_text())


def test_rerun_reuses_the_baseline_and_registers_nothing_new(prefect_harness, flow_settings, tiny_models,
                                                             train_calls, registry_client, restore_environ):
    code, summary = _cli_pipeline(flow_settings, tiny_models("llama"))

    assert code == 0  # PASS
    assert train_calls == {"lora": 1}  # the FullFT baseline came from Prefect's cache
    assert summary["baseline_cached"]
    assert summary["registration"] == {"name": NAME, "version": "1", "created": False}
    assert not summary["promotion"]["promoted"]
    assert _versions(registry_client) == [1]
    assert _aliases(registry_client) == {"candidate": "1", "champion": "1"}


def test_regretful_run_moves_no_alias(prefect_harness, flow_settings, tiny_models, train_calls, registry_client,
                                      restore_environ):
    # A LoRA LR of 1e-7 barely moves the adapter while FullFT learns; zero regret is allowed.
    code, summary = _cli_pipeline(flow_settings, tiny_models("llama"), lora_lr=1e-7, full_lr=1e-3, threshold=0,
                                  threshold_abs=0)

    verdict = summary["comparison"]["verdict"]
    assert verdict in ("FAIL", "INCONCLUSIVE") and code == {"FAIL": 1, "INCONCLUSIVE": 3}[verdict]
    assert summary["comparison"]["regret_nats"] > 0
    assert summary["registration"] is None and summary["promotion"] is None
    assert _latest_flow_run_tags() >= {f"verdict:{verdict}"}
    assert any(w.startswith("LR: the configured LoRA LR 1e-07") for w in summary["warnings"])
    assert _versions(registry_client) == [1]
    assert _aliases(registry_client) == {"candidate": "1", "champion": "1"}


def test_failing_step_leaves_the_registry_untouched(run_pipeline, tiny_models, monkeypatch, registry_client,
                                                    flow_settings):
    import trainer.loop
    from trainer.loop import train

    def lora_breaks(config, *args, **kwargs):
        if config.method == "lora":
            raise RuntimeError("CUDA error: device-side assert triggered (simulated)")
        return train(config, *args, **kwargs)

    monkeypatch.setattr(trainer.loop, "train", lora_breaks)
    with pytest.raises(RuntimeError, match="simulated"):
        run_pipeline(tiny_models("llama"), rank=2)

    assert _versions(registry_client) == [1]
    assert _aliases(registry_client) == {"candidate": "1", "champion": "1"}
    experiment = registry_client.get_experiment_by_name(f"lowregret/{NAME}")
    latest = registry_client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{NAME} pipeline'",
                                         order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert latest.info.status == "FAILED"


def test_bad_config_is_a_user_error_before_any_work(run_pipeline, tiny_models, train_calls, registry_client,
                                                    tmp_path):
    with pytest.raises(UserError, match="rank"):
        load_pipeline_config(None, tiny_overrides(tiny_models("llama"), rank=0))
    with pytest.raises(UserError, match="lora_lr"):
        load_pipeline_config(None, tiny_overrides(tiny_models("llama"), lora_lr="fast"))
    with pytest.raises(UserError, match="Unknown option"):
        load_pipeline_config(None, ["rnak=4"])
    with pytest.raises(UserError, match="set by the pipeline"):
        load_pipeline_config(None, ["train.method=full"])
    experiment = registry_client.get_experiment_by_name(f"lowregret/{NAME}")
    runs_before = len(registry_client.search_runs([experiment.experiment_id]))
    with pytest.raises(UserError):
        run_pipeline(tiny_models("llama"), dataset=str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="not found"):
        run_pipeline(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError):  # a Hub id on a machine without the Hub
        run_pipeline("no-such-org/no-such-model")
    assert sum(train_calls.values()) == 0
    assert len(registry_client.search_runs([experiment.experiment_id])) == runs_before


def test_seed_replicates_share_the_held_out_set_and_report_seed_noise(run_pipeline, tiny_models, train_calls):
    summary = run_pipeline(tiny_models("llama"), seeds=[0, 1])

    assert train_calls == {"lora": 2, "full": 1}  # seed 0's baseline is cached from the first test
    interval = summary["comparison"]["interval"]
    assert interval["seeds"] == 2 and len(interval["seed_regrets"]) == 2
    assert interval["full_seed_sd"] is not None and interval["seed_half_width"] > 0
    assert [r["final_eval_loss"] for r in summary["baselines"]][0] == pytest.approx(summary["baseline"]["final_eval_loss"])
    examples = [json.loads((Path(r["output_dir"]) / "eval_scores.json").read_text())["ids"]
                for r in summary["baselines"] + summary["loras"]]
    assert all(ids == examples[0] for ids in examples)
