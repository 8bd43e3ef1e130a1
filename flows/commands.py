"""`lowregret pipeline | demo | sweep | study | promote | rollback | deploy`: the flows' sub-commands.

Nothing heavy at module level: each handler exports the embedded defaults (flows.settings) and
only then imports Prefect and MLflow, which read their settings at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

# Shipped inside the package (package-data), so `lowregret demo` works from a plain pip install too;
# not under configs/, whose every YAML the trainer's tests load as a TrainConfig.
DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"
DEMO_PROMPT = [{"role": "user", "content": "What does the Python function os.path.join do?"}]


def register(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="plan, FullFT baseline, LoRA, compare, register and promote")
    _config_args(p)
    p.add_argument("--plan-only", action="store_true", help="write the capacity-plan report and stop")
    p.set_defaults(func=run_pipeline)

    p = subparsers.add_parser("demo", help="the pipeline end to end on SmolLM2 and a built-in dataset (CPU, minutes)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override the demo preset")
    p.add_argument("--workdir", help="where .lowregret/, runs/ and reports/ go (default: here)")
    p.set_defaults(func=run_demo, config=str(DEMO_CONFIG), plan_only=False)

    p = subparsers.add_parser("sweep", help="grid over method × rank × LR, fanned out by a Prefect task runner")
    _config_args(p)
    p.add_argument("--runner", default="process", choices=("process", "thread", "dask", "ray"),
                   help="Prefect task runner (default process; dask/ray need prefect-dask/prefect-ray)")
    p.add_argument("--workers", type=int, help="concurrent runs (default: the runner's own)")
    p.set_defaults(func=run_sweep)

    p = subparsers.add_parser("study", help="test the planner's predictions against real runs; calibrate it (docs/STUDY.md)")
    p.add_argument("--quick", action="store_true", help="the CI-sized study on a tiny model (~2 min) instead of the full one")
    p.add_argument("--workers", type=int, default=2, help="runs trained at once, one CPU thread each (default 2)")
    p.add_argument("--calibrate", nargs="?", const="", metavar="PATH",
                   help="write the calibration record (default: the planner's own planner/calibration.json)")
    p.add_argument("--docs", metavar="DIR", help="also copy results.json and the charts to DIR (docs/study)")
    p.add_argument("--workdir", help="where .lowregret/, runs/ and reports/ go (default: here)")
    p.set_defaults(func=run_study)

    p = subparsers.add_parser("promote", help="force a registered version to @champion")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="version number")
    p.add_argument("--reason", required=True, help="why (kept as the version's promoted_reason tag)")
    p.add_argument("--workdir", help="where .lowregret/ is (default: here)")
    p.set_defaults(func=run_promote)

    p = subparsers.add_parser("rollback", help="give @champion back to the previous champion")
    p.add_argument("name", help="registered model name")
    p.add_argument("--reason", default="rollback", help="why (kept as the demoted version's rolled_back tag)")
    p.add_argument("--workdir", help="where .lowregret/ is (default: here)")
    p.set_defaults(func=run_rollback)

    p = subparsers.add_parser("deploy", help="schedule the pipeline (served here, or sent to a work pool)")
    _config_args(p)
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    p.add_argument("--name", default="scheduled", help="deployment name (default scheduled)")
    p.add_argument("--work-pool", help="register with this work pool instead of serving from this process")
    p.set_defaults(func=run_deploy)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="pipeline YAML (see configs/); default: the built-in defaults")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. rank=8 train.max_steps=20")
    p.add_argument("--workdir", help="where .lowregret/, runs/ and reports/ go (default: here)")


def _environment(args):
    from flows.settings import apply_environment, load_settings

    return apply_environment(load_settings(args.workdir))


def run_pipeline(args) -> int:
    settings = _environment(args)
    from flows.config import load_pipeline_config

    config = load_pipeline_config(args.config, args.overrides)  # UserError here, before any work
    if args.plan_only:
        from flows.pipeline import plan_report

        plan = plan_report(config, workdir=str(settings.home.parent))
        print("\n".join(plan["summary"]))
        print(f"Report: {plan['files'].get('plan.html', plan['files'])}")
        return 0
    from evaluation.compare import EXIT_CODES
    from flows.pipeline import pipeline

    summary = pipeline(config, workdir=str(settings.home.parent))
    print(format_summary(summary, settings))
    return EXIT_CODES[summary["comparison"]["verdict"]]  # 0 PASS, 1 FAIL, 3 INCONCLUSIVE (2: bad input)


def run_demo(args) -> int:
    import time

    started = time.perf_counter()
    settings = _environment(args)
    from flows.config import load_pipeline_config

    config = load_pipeline_config(args.config, args.overrides)
    from flows.pipeline import pipeline

    print(f"lowregret demo: {config.model} on {config.dataset}, LoRA r={config.rank} vs FullFT "
          f"({config.train.get('max_steps')} steps each). Training progress follows.\n", flush=True)
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
    settings = _environment(args)
    from flows.config import load_sweep_config

    config = load_sweep_config(args.config, args.overrides)
    from flows.sweep import make_task_runner, sweep

    runner = make_task_runner(args.runner, args.workers)
    with _shared_ephemeral_server(settings, args.runner):
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
    from planner.errors import UserError

    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: train at least 1 run at a time.")
    calibrate = None if args.calibrate is None else (args.calibrate or str(CALIBRATION_FILE))
    if args.quick and calibrate == str(CALIBRATION_FILE):
        raise UserError("--quick with --calibrate would replace the planner's calibration by a tiny model's numbers: "
                        "pass a path (--calibrate /tmp/calibration.json) or drop --quick.")
    if calibrate and not Path(calibrate).parent.is_dir():
        raise UserError(f"--calibrate {calibrate}: folder {Path(calibrate).parent} does not exist.")
    settings = _environment(args)
    if args.workers > 1:
        # One thread per worker: two 2-thread runs on 2 cores fight over them (measured, docs/STUDY.md).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    from flows.study import study
    from flows.sweep import make_task_runner
    from study.report import summary_lines

    command = " ".join(["lowregret", *sys.argv[1:]]) if sys.argv[0].endswith(("lowregret", "cli.py")) else "lowregret study"
    with _shared_ephemeral_server(settings, "process"):
        results = study.with_options(task_runner=make_task_runner("process", args.workers))(
            scale_name="quick" if args.quick else "full", workdir=str(settings.home.parent),
            calibrate_path=calibrate, docs_dir=args.docs, command=command)
    print("\n".join(summary_lines(results)))
    import resource

    cpu_s = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                for field in ("ru_utime", "ru_stime"))
    print(f"CPU time of this command and its workers: {cpu_s:,.0f} s (user + system)")
    return 0


@contextlib.contextmanager
def _shared_ephemeral_server(settings, runner: str):
    """Without PREFECT_API_URL, each worker process of the process runner would start an ephemeral
    server of its own (seen: four for a 3-worker sweep): start Prefect's once and export its URL."""
    if settings.prefect_api_url is not None or runner != "process":
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()  # Prefect's own singleton, stopped at exit
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _client(args):
    from flows.registry import client_for
    from flows.settings import configure_mlflow

    settings = _environment(args)
    configure_mlflow(settings)
    return client_for(settings)


def run_promote(args) -> int:
    from flows import registry

    decision = registry.promote(_client(args), args.name, args.version, args.reason)
    print(f"{args.name} v{decision.version}: {'champion' if decision.promoted else 'unchanged'} ({decision.reason})")
    return 0


def run_rollback(args) -> int:
    from flows import registry

    decision = registry.rollback(_client(args), args.name, args.reason)
    print(f"{args.name}: champion is v{decision.version} again ({decision.reason})")
    return 0


def run_deploy(args) -> int:
    settings = _environment(args)
    from flows.config import load_pipeline_config

    config = load_pipeline_config(args.config, args.overrides)
    _check_cron(args.cron)
    from flows import deploy

    workdir = str(settings.home.parent)
    if args.work_pool:
        deployment_id = deploy.deploy_to_work_pool(config, args.cron, args.name, args.work_pool, workdir)
        print(f"Deployment lowregret-pipeline/{args.name} ({deployment_id}) on work pool {args.work_pool!r}, "
              f"cron {args.cron!r}. Start a worker: prefect worker start --pool {args.work_pool}")
        return 0
    print(f"Serving lowregret-pipeline/{args.name} on cron {args.cron!r} from this process (Ctrl-C stops).")
    deploy.serve_pipeline(config, args.cron, args.name, workdir)
    return 0


def _check_cron(cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    from planner.errors import UserError

    try:
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
    reg, promo = summary.get("registration"), summary.get("promotion")
    if reg:
        lines.append(f"Registered {reg['name']} v{reg['version']}" + ("" if reg["created"] else " (already registered)")
                     + f"; champion: {'yes' if promo['promoted'] else 'no'} ({promo['reason']})")
    else:
        lines.append(f"Not registered: only a PASS registers and promotes (verdict {comparison['verdict']}).")
    db = settings.tracking_uri
    lines += [
        "",
        f"Plan report: {summary['plan']['files'].get('plan.html', '')}",
        f"Curves:      {summary['chart']}",
        f"Summary:     {Path(summary['chart']).parent / 'summary.json'}",
        f"MLflow UI:   mlflow ui --backend-store-uri {db}",
    ]
    return "\n".join(lines)
