"""`lowregret pipeline` and `rl-pipeline` with 2 training processes end to end on a tiny llama: the FullFT baseline
(FSDP2) and the LoRA adapter (DDP) are trained under the launcher (torchrun, 2 gloo processes), the
regret computed, the adapter registered and promoted exactly as a one-process run's; a second
pipeline at another LoRA rank reuses the baseline, which the launch's world size keys
(train.launch.processes) and the adapter's shape does not."""

from __future__ import annotations

import json

import pytest

from flows.config import load_pipeline_config
from tests.flows.test_pipeline import tiny_overrides

NAME = "tiny-launched"
pytestmark = pytest.mark.slow


def test_pipeline_trains_both_runs_under_the_launcher_registers_and_reuses_the_baseline(
        prefect_harness, flow_settings, tiny_models, registry_client, monkeypatch):
    import logging

    import trainer.loop
    from flows.pipeline import pipeline

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    task_log = Lines()
    logging.getLogger("prefect.task_runs").addHandler(task_log)

    def in_process(*args, **kwargs):
        raise AssertionError("a launched run must not train in the flow's process")

    monkeypatch.setattr(trainer.loop, "train", in_process)
    overrides = tiny_overrides(tiny_models("llama"), name=NAME, **{"train.launch.processes": 2})
    first = pipeline(load_pipeline_config(None, overrides), workdir=str(flow_settings.home.parent))

    assert first["comparison"]["verdict"] == "PASS" and not first["baseline_cached"]
    assert first["registration"] == {"name": NAME, "version": "1", "created": True}
    assert first["promotion"]["promoted"]
    assert {a: str(v) for a, v in registry_client.get_registered_model(NAME).aliases.items()} == {
        "candidate": "1", "champion": "1"}
    _assert_trained_by_two_ranks(flow_settings.runs_dir / NAME)
    logging.getLogger("prefect.task_runs").removeHandler(task_log)
    assert any(line.startswith("launch: 2 processes, sharding fsdp") for line in task_log.lines)
    assert any(line.startswith("done: 6 steps") for line in task_log.lines)  # the ranks' lines reach the task log

    second = pipeline(load_pipeline_config(None, overrides + ["rank=2"]), workdir=str(flow_settings.home.parent))
    assert second["baseline_cached"]
    assert second["registration"]["version"] == "2"


def test_rl_pipeline_trains_both_runs_under_the_launcher_and_registers(prefect_harness, flow_settings, tiny_models,
                                                                       registry_client, monkeypatch, tmp_path):
    """`rl-pipeline` with rl.launch.processes=2: LoRA (DDP) and FullFT (FSDP2) RL runs trained by the
    ranks, the rewards compared, the adapter registered and promoted. ~25 s."""
    import trainer.rl
    from flows.config import load_rl_pipeline_config
    from flows.pipeline import pipeline
    from tests.flows.test_rl_pipeline import tiny_overrides as rl_overrides
    from tests.trainer.test_rl import write_prompts

    def in_process(*args, **kwargs):
        raise AssertionError("a launched run must not train in the flow's process")

    monkeypatch.setattr(trainer.rl, "train_rl", in_process)
    name = "tiny-rl-launched"
    overrides = rl_overrides(tiny_models("llama"), write_prompts(tmp_path / "prompts.jsonl"), name=name,
                             **{"rl.launch.processes": 2})
    summary = pipeline(load_rl_pipeline_config(None, overrides), workdir=str(flow_settings.home.parent))

    assert summary["comparison"]["verdict"] == "PASS" and summary["comparison"]["prompts"] == 4
    assert summary["registration"] == {"name": name, "version": "1", "created": True}
    assert summary["promotion"]["promoted"]
    _assert_trained_by_two_ranks(flow_settings.runs_dir / name)


def _assert_trained_by_two_ranks(runs_dir) -> None:
    """The baseline was sharded by 2 FSDP2 ranks (its parameters DTensors) and the adapter trained by 2 DDP ranks."""
    runs = {}
    for summary_path in runs_dir.glob("*/summary.json"):
        run = json.loads(summary_path.read_text())
        runs[run["method"]] = run
    assert (runs["full"]["processes"], runs["full"]["sharding"], runs["full"]["sharded_parameters"]) == (2, "fsdp", True)
    assert (runs["lora"]["processes"], runs["lora"]["sharding"]) == (2, "ddp")
