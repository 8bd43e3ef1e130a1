"""`lowregret pipeline | rl-pipeline | demo | sweep | study` and `--dry-run` (flows/commands.py
registers them)."""

from __future__ import annotations

from pathlib import Path

from data.errors import UserError
from flows.commands import DEMO_PROMPT, _prefect_server, _settings, _start


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
    from flows.pipeline import pipeline

    with _prefect_server(settings):
        summary = pipeline(config, workdir=str(settings.home.parent))
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

    plan = pipeline_plan(config, config.train_config("lora"))
    print(f"Capacity plan (LoRA r={config.rank}):\n  " + "\n  ".join(summary_lines(plan)))
    print("Dry run: nothing trained, nothing written.")
    return 0


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
