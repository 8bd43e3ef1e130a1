"""TrainConfig: defaults, validation before any work, YAML presets and overrides."""

from pathlib import Path

import pytest
import yaml

from data.config_kit import parse_yaml
from data.errors import UserError
from trainer.config import DEFAULT_FULL_LR, DEFAULT_LORA_LR, TrainConfig, load_config

_ROOT = Path(__file__).parents[2] / "configs"
# Trainer presets (configs/<model>/<method>.yaml); configs/pipelines and configs/sweeps hold the
# flows' templates (tests/flows/test_cli_help.py loads those), configs/rl/ the RL presets (RLConfig,
# RLPipelineConfig; tests/trainer/test_rl.py loads those).
CONFIGS = sorted(p for p in _ROOT.rglob("*.yaml")
                 if p.parent.name not in ("pipelines", "sweeps") and p.relative_to(_ROOT).parts[0] != "rl")


def test_defaults_are_valid_and_lr_follows_method():
    assert TrainConfig().lr == DEFAULT_LORA_LR
    assert TrainConfig(method="full").lr == DEFAULT_FULL_LR == DEFAULT_LORA_LR / 10
    assert TrainConfig(method="full").output_dir == "runs/full"
    assert TrainConfig(rank=8).output_dir == "runs/lora-r8"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "qlora"}, "method"),
        ({"rank": 0}, "rank"),
        ({"rank": -4}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"targets": "q_proj,,v_proj"}, "targets"),
        ({"lr": 2.0}, "lr"),
        ({"max_steps": 0}, "max_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"eval_fraction": 0.0}, "eval_fraction"),
        ({"warmup_steps": 100}, "warmup_steps"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"expert_rank_divisor": "half"}, "expert_rank_divisor"),
        ({"eval_points": 1}, "eval_points"),
        ({"resume": "auto", "overwrite": True}, "contradict"),
        ({"rank": 2.5}, "whole number"),
        ({"packing": "yes"}, "true or false"),
        ({"lr": "fast"}, "number"),
        ({"max_steps": 10, "num_epochs": 2}, "both set: give one"),
        ({"num_epochs": 0}, "num_epochs=0.0: must be positive"),
        ({"report_to": "wandb"}, "report_to"),
    ],
)
def test_bad_values_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**overrides)


def test_num_epochs_replaces_max_steps():
    assert TrainConfig().max_steps == 100 and TrainConfig().num_epochs is None
    config = TrainConfig(num_epochs=1.5, warmup_steps=3)
    assert config.max_steps is None
    assert config.total_steps(train_rows=100, global_batch=8) == 19  # ceil(1.5 * 100 / 8)
    assert TrainConfig(max_steps=7).total_steps(train_rows=100, global_batch=8) == 7
    with pytest.raises(UserError, match="warmup_steps=3 does not fit in the 2 steps"):
        config.total_steps(train_rows=10, global_batch=8)
    # num_epochs changes what is trained; report_to does not.
    assert config.hash() != TrainConfig(num_epochs=2, warmup_steps=3).hash()
    assert TrainConfig(report_to="mlflow").hash() == TrainConfig().hash()


def test_full_ignores_rank():
    assert TrainConfig(method="full", rank=0).method == "full"


def test_overrides_are_typed_yaml_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: lora\nlr: 1e-4\nrank: 8\n")  # YAML reads 1e-4 as a string
    config = load_config(path, ["rank=32", "packing=true", "eval_dataset=null", "max_grad_norm=1"])
    assert (config.lr, config.rank, config.packing, config.eval_dataset) == (1e-4, 32, True, None)
    assert config.max_grad_norm == 1.0


def test_only_true_and_false_are_booleans(tmp_path):
    """YAML 1.1 reads no/yes/on/off as booleans; the documented mixed_precision=no must stay a string."""
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\npacking: true\n")
    assert load_config(path).mixed_precision == "no" and load_config(path).packing is True
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    assert parse_yaml("a: off\nb: FALSE\nc: Yes") == {"a": "off", "b": False, "c": "Yes"}
    with pytest.raises(yaml.YAMLError):  # still a safe loader: no Python object is built
        parse_yaml("!!python/object/apply:os.system [echo hi]")


@pytest.mark.parametrize("override", ["lr", "=3", "nope=1"])
def test_bad_overrides_are_user_errors(override):
    with pytest.raises(UserError):
        load_config(None, [override])


def test_missing_config_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_hash_ignores_where_output_goes_but_not_what_is_trained():
    base = TrainConfig()
    assert base.hash("d") == TrainConfig(output_dir="elsewhere", checkpoint_every=7).hash("d")
    assert base.hash("d") != TrainConfig(rank=8).hash("d")
    # A FullFT baseline is the same run whatever LoRA shape a pipeline compares it with.
    full = TrainConfig(method="full")
    assert full.hash("d") == TrainConfig(method="full", rank=8, alpha=16, targets="mlp").hash("d")
    assert full.hash("d") != TrainConfig(method="full", lr=1e-4).hash("d")
    assert base.hash("d") != base.hash("other data")


def test_there_are_presets():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_preset_loads(path):
    config = load_config(path)
    assert config.method in ("lora", "full")
    assert config.output_dir


def test_config_result_and_callbacks_import_no_heavy_module():
    import subprocess
    import sys

    code = (
        "import sys, trainer, trainer.callbacks, trainer.config, trainer.result\n"
        "print(','.join(m for m in ('torch', 'transformers', 'peft', 'prefect', 'mlflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == ""


def test_trainer_never_imports_flows_prefect_or_mlflow():
    """docs/ARCHITECTURE.md: data flows one way; MLflow logging reaches the loop through callbacks."""
    import ast

    for path in sorted((Path(__file__).parents[2] / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("flows", "prefect", "mlflow"), f"{path.name} imports {name}"
