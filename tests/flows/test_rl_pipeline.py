"""The RL pipeline flow end to end on a tiny llama: real RL trainer, reward comparison, planner,
Prefect (test server) and MLflow (SQLite in tmp_path). The tests share one registered model and run
in order: first run → PASS, registered, champion; re-run → cached baseline, nothing new."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from data.errors import UserError
from flows.config import load_rl_pipeline_config

NAME = "tiny-rl-pipeline"
PRESETS = sorted((Path(__file__).parents[2] / "configs" / "rl" / "pipelines").glob("*.yaml"))
pytestmark = pytest.mark.slow


def tiny_overrides(model_dir, prompts, **extra) -> list[str]:
    """An RL pipeline that trains in seconds: 3 steps of 2 prompts × 4 samples of 3 tokens.

    The reward (a completion's share of vowels) is one a random tiny model earns by chance; an
    allowed regret of 1.0 (the reward's whole range) makes the verdict PASS whatever is learnt.
    """
    options = {"name": NAME, "model": str(model_dir), "dataset": str(prompts),
               "reward": "python:tests.trainer.rl_task:vowel_share", "rank": 1, "lora_lr": 1e-2, "full_lr": 1e-3,
               "allowed_regret": 1.0, "rl.max_steps": 3, "rl.prompts_per_step": 2, "rl.group_size": 4,
               "rl.max_new_tokens": 3, "rl.eval_points": 2, "rl.eval_max_examples": 6} | extra
    return [f"{key}={value}" for key, value in options.items()]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """One prompts file for the module: the dataset's path is part of the run key, so the re-run
    reuses the first run's baseline only if it reads the same file."""
    from tests.trainer.test_rl import write_prompts

    return write_prompts(tmp_path_factory.mktemp("rl-prompts") / "prompts.jsonl")


@pytest.fixture
def rl_calls(monkeypatch):
    """Counts trainer.rl.train_rl calls by method (the tasks import it when they run)."""
    import trainer.rl

    calls = collections.Counter()
    real = trainer.rl.train_rl

    def counting(config, *args, **kwargs):
        calls[config.method] += 1
        return real(config, *args, **kwargs)

    monkeypatch.setattr(trainer.rl, "train_rl", counting)
    return calls


@pytest.fixture
def run_rl_pipeline(prefect_harness, flow_settings):
    from flows.pipeline import pipeline

    def run(model_dir, prompts, **extra):
        return pipeline(load_rl_pipeline_config(None, tiny_overrides(model_dir, prompts, **extra)),
                           workdir=str(flow_settings.home.parent))

    return run


def test_first_run_passes_registers_and_promotes(run_rl_pipeline, tiny_models, prompts, rl_calls, registry_client):
    summary = run_rl_pipeline(tiny_models("llama"), prompts)

    assert rl_calls == {"full": 1, "lora": 1}
    comparison = summary["comparison"]
    assert comparison["verdict"] == "PASS" and comparison["prompts"] == 4 and not summary["baseline_cached"]
    assert summary["plan"]["verdict"] == "low-regret" and summary["plan"]["smallest_rank"] == 1
    assert summary["registration"] == {"name": NAME, "version": "1", "created": True}
    assert summary["promotion"]["promoted"]
    aliases = {a: str(v) for a, v in registry_client.get_registered_model(NAME).aliases.items()}
    assert aliases == {"candidate": "1", "champion": "1"}
    tags = registry_client.get_model_version(NAME, "1").tags
    assert tags["objective"] == "rl" and tags["rank"] == "1" and tags["verdict"] == "PASS"
    assert tags["reward"] == "python:tests.trainer.rl_task:vowel_share"
    assert float(tags["eval_reward"]) == pytest.approx(summary["lora"]["final_eval_reward"])
    assert Path(summary["chart"]).stat().st_size > 10_000
    history = registry_client.get_metric_history(registry_client.get_model_version(NAME, "1").run_id, "eval_reward")
    assert [m.step for m in history] == [0, 3]


def test_rerun_reuses_the_baseline_and_registers_nothing_new(run_rl_pipeline, tiny_models, prompts, rl_calls,
                                                             registry_client):
    summary = run_rl_pipeline(tiny_models("llama"), prompts)

    assert rl_calls == {"lora": 1} and summary["baseline_cached"]
    assert summary["registration"] == {"name": NAME, "version": "1", "created": False}
    assert not summary["promotion"]["promoted"]


@pytest.mark.parametrize("overrides, says", [
    (["rank=0"], "rank"),
    (["rl.method=full"], "set by the pipeline"),
    (["rl.group_size=1"], "group_size=1"),
    (["reward=contains"], "not a reward spec"),
    (["allowed_regret=-1"], "allowed_regret"),
    (["rnak=4"], "Unknown option"),
])
def test_bad_config_is_a_user_error_before_any_work(overrides, says):
    with pytest.raises(UserError, match=says):
        load_rl_pipeline_config(None, overrides)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_rl_pipeline_preset_loads(preset):
    config = load_rl_pipeline_config(preset)
    assert config.train_config("lora").rank == config.rank and config.train_config("full").method == "full"


def test_rl_champions_are_ranked_by_reward_higher_is_better(registry_client, flow_settings, tiny_adapter, tmp_path):
    from flows import registry
    from tests.flows.test_registry import _run

    client, name = registry_client, "tiny-rl-rules"
    uri = registry.log_adapter_model(_run(flow_settings, "rl-rules"), tiny_adapter(0), "unused-base", tmp_path)

    def register(fingerprint, reward):
        reg = registry.register_adapter(client, name, uri, fingerprint, {"eval_reward": reward})
        return registry.promote_if_better(client, name, reg.version, passed=True, eval_reward=reward)

    assert register("a", 0.5).promoted
    worse = register("b", 0.4)
    assert not worse.promoted and "eval reward 0.4000 < champion v1's 0.5000" in worse.reason
    better = register("c", 0.6)
    assert better.promoted and better.previous_champion == "1" and ">=" in better.reason


@pytest.mark.parametrize("overrides, says", [
    (["--config", "MISSING.yaml"], "not found"),
    (["rank=0"], "rank"),
    (["dataset=MISSING.jsonl"], "not found"),
    (["reward=python:no_such_module_xyz:score"], "cannot import"),
    (["rl.max_prompt_tokens=4"], "max_prompt_tokens=4"),
])
def test_cli_bad_input_exits_2_before_anything_is_written(tiny_models, prompts, tmp_path, restore_environ, capsys,
                                                         overrides, says):
    from flows.cli import main

    workdir = tmp_path / "work"
    workdir.mkdir()
    args = [a.replace("MISSING", str(tmp_path / "missing")) for a in overrides] + [f"model={tiny_models('llama')}"]
    if not any(a.startswith("dataset=") for a in args):
        args.append(f"dataset={prompts}")
    assert main(["rl-pipeline", "--workdir", str(workdir), *args]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert list(workdir.iterdir()) == []  # no .lowregret/, runs/ or reports/
