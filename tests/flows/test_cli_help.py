"""Daily use of the CLI: a description for every command, `train --help` generated from
TrainConfig's field docs, --version, the commented config templates, --dry-run and quiet output."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import pytest

from data.config_kit import field_docs
from flows.cli import CHECKED_WARNINGS, QUIET_ENVIRONMENT, build_parser, main, quiet, version
from flows.commands import PIPELINE_TEMPLATE, SWEEP_TEMPLATE
from flows.config import PipelineConfig, SweepConfig, load_pipeline_config, load_sweep_config
from trainer.config import TrainConfig

ROOT = Path(__file__).parents[2]


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action


def test_every_command_has_a_description_and_a_help_line():
    parser, action = _subparsers()
    listed = {choice.dest for choice in action._choices_actions}
    assert set(action.choices) == listed  # each command has a line in `lowregret --help`
    for name, sub in action.choices.items():
        assert sub.description and len(sub.description) > 40, name
        assert "--verbose" in sub.format_help(), name


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lowregret {version()}" and version()[0].isdigit()


@pytest.mark.parametrize("command, cls", [("train", TrainConfig), ("pipeline", PipelineConfig), ("sweep", SweepConfig)])
def test_help_lists_every_option_with_default_and_doc(command, cls):
    _, action = _subparsers()
    text = action.choices[command].format_help()
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        assert docs.get(field.name), f"{cls.__name__}.{field.name} has no #: documentation"
        assert f"\n  {field.name} (default " in text, field.name
        assert " ".join(docs[field.name].split())[:40] in " ".join(text.split()), field.name
    assert "  max_length (default 512)\n      Tokens per sequence" in action.choices["train"].format_help()


def test_templates_exist_load_and_are_what_help_points_to():
    _, action = _subparsers()
    assert PIPELINE_TEMPLATE in " ".join(action.choices["pipeline"].format_help().split())
    assert SWEEP_TEMPLATE in " ".join(action.choices["sweep"].format_help().split())
    pipelines = sorted((ROOT / "configs" / "pipelines").glob("*.yaml"))
    sweeps = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert ROOT / PIPELINE_TEMPLATE in pipelines and ROOT / SWEEP_TEMPLATE in sweeps
    for path in pipelines:
        config = load_pipeline_config(path)
        assert config.train_config("lora").method == "lora"
        assert path.read_text().count("\n#") >= 10  # commented, key by key
    for path in sweeps:
        assert len(load_sweep_config(path).grid()) >= 2
        assert path.read_text().count("\n#") >= 5


@pytest.fixture
def small_data(tmp_path):
    path = tmp_path / "data" / "alpaca.jsonl"
    path.parent.mkdir()
    rows = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("command", ["pipeline", "sweep"])
def test_dry_run_prints_config_and_plan_and_writes_nothing(command, small_data, tiny_models, tmp_path, monkeypatch,
                                                           capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model = str(tiny_models("llama"))
    prefix = "" if command == "pipeline" else "base."
    template = PIPELINE_TEMPLATE if command == "pipeline" else SWEEP_TEMPLATE
    argv = [command, "--dry-run", "--config", str(ROOT / template), f"{prefix}model={model}",
            f"{prefix}dataset={small_data}", f"{prefix}train.max_length=64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Resolved config:" in out and f"model: {model}" in out
    assert ("Runs (2):" if command == "pipeline" else "Runs (9):") in out
    assert "Capacity plan (LoRA r=16):" in out and "Dataset " + str(small_data) + " (alpaca): 24 examples" in out
    assert out.rstrip().endswith("Dry run: nothing trained, nothing written.")
    assert list(work.iterdir()) == []  # no .lowregret/, runs/ or reports/


def test_dry_run_refuses_bad_config_before_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "--dry-run", "info_method=zip"]) == 2
    assert "info_method='zip' is not one of" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_quiet_by_default_verbose_shows(monkeypatch):
    for key in QUIET_ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "DEBUG")  # a user's own setting wins
    for verbose, expected in ((True, len(CHECKED_WARNINGS)), (False, 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet(verbose)
            for category, message in CHECKED_WARNINGS:
                warnings.warn(message.replace("\\", "").removeprefix(".*") + " (example)", category, stacklevel=1)
            warnings.warn("an unchecked warning", UserWarning, stacklevel=1)
        assert len(caught) == expected + 1
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    assert os.environ["PREFECT_LOGGING_LEVEL"] == "DEBUG"
