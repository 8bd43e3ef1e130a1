"""The pipeline flow: plan → FullFT baseline (cached) → LoRA → compare → register → promote.

Each step is a task (flows/tasks.py); this module only wires them and decides where files go:
`runs/<name>/full-<key>` and `runs/<name>/lora-r<rank>-<key>` (key = `tasks.run_key`: what is
trained, on which data, by which code), `reports/<name>/` for the plan report, the chart and
`summary.json`. With `seeds: [...]` both methods are trained once per seed and compared as paired
replicates. MLflow gets one experiment per pipeline (`lowregret/<name>`) with a parent run per
pipeline run and a nested run per step; the parent run and the Prefect flow run carry the gate's
verdict. Only a PASS registers (alias `candidate`) and may move `champion`.
"""

# No `from __future__ import annotations`: Prefect builds the flows' parameter models from these
# annotations when a deployment loads this file by path, where string annotations do not resolve.
import dataclasses
from pathlib import Path

from prefect import flow

from evaluation.curves import curves_title
from flows import tasks
from flows.config import PipelineConfig
from flows.locks import run_lock
from flows.settings import configure_mlflow, load_settings
from flows.tracking import STATE_HOOKS


@flow(name="lowregret-plan")
def plan_report(config: PipelineConfig, workdir: str | None = None) -> dict:
    """Write the capacity-plan report of `config`'s LoRA run and nothing else."""
    settings = load_settings(workdir)
    tasks.check_inputs(config)
    return tasks.make_plan(config, str(settings.reports_dir / config.name / "plan"))


@flow(name="lowregret-pipeline", **STATE_HOOKS)
def pipeline(config: PipelineConfig, workdir: str | None = None) -> dict:
    """Train a LoRA adapter, prove it against a FullFT baseline, register and maybe promote it.

    A failure, a crash (SIGTERM, Ctrl-C) or a cancellation ends the MLflow runs FAILED or KILLED
    (flows.tracking's state hooks). Identical pipelines (same run keys) take turns from training to
    registration (`run_lock`): they write one set of run folders and register one version.

    Returns:
        The pipeline summary (also written to reports/<name>/summary.json and logged to MLflow);
        `summary["comparison"]["verdict"]` is PASS, FAIL or INCONCLUSIVE.
    """
    from evaluation.compare import design_warnings

    settings = load_settings(workdir)
    configure_mlflow(settings)
    data = tasks.check_inputs(config)
    code = tasks.code_version()
    runs, reports = settings.runs_dir / config.name, settings.reports_dir / config.name
    seeds = config.run_seeds
    planned = [{method: _run_config(config, method, runs, data["fingerprint"], code, seed)
                for method in ("full", "lora")} for seed in seeds]
    fingerprint = "-".join(f"{p['lora'][1]}-{p['full'][1]}" for p in planned)
    lora_config = planned[0]["lora"][0]

    parent = tasks.start_tracking(settings, config.experiment, f"{config.name} pipeline", config.to_dict(),
                                  tags={"code_version": code, "dataset_fingerprint": data["fingerprint"]})
    plan = tasks.make_plan(config, str(reports / "plan"))
    print("Capacity plan:\n  " + "\n  ".join(plan["summary"]), flush=True)
    warnings = design_warnings(lora_config.max_steps, data["held_out_examples"])
    warnings += [f"LR: {plan['lr_warning']}"] if plan["lr_warning"] else []
    for warning in warnings:
        print(f"warning: {warning}", flush=True)
    plan_run = tasks.start_tracking(settings, config.experiment, f"{config.name} plan", {"rank": config.rank},
                                    parent)
    tasks.log_files(settings, plan_run, list(plan["files"].values()),
                    tags={"verdict": plan["verdict"], "lr_warning": plan["lr_warning"] or ""},
                    metrics={"adapter_params": plan["adapter_params"], "advised_lora_lr": plan["advised_lora_lr"],
                             "lora_lr": config.lora_lr}, artifact_path="plan")
    tasks.end_tracking(settings, plan_run)

    with run_lock(settings, fingerprint):
        fulls, loras, lora_runs, cached = [], [], [], []
        for (full_config, full_key), (train_config, lora_key) in ((p["full"], p["lora"]) for p in planned):
            full, was_cached = _baseline(full_config, data["fingerprint"], code, config.refresh_baseline)
            full_run = _track_training(settings, config, full_config, full, parent, data,
                                       {"cached": was_cached, "run_key": full_key})
            tasks.end_tracking(settings, full_run)
            lora = tasks.train_adapter(train_config)
            lora_runs.append(_track_training(settings, config, train_config, lora, parent, data, {"run_key": lora_key}))
            fulls.append(full)
            loras.append(lora)
            cached.append(was_cached)

        comparison = tasks.compare_runs([r.output_dir for r in loras], [r.output_dir for r in fulls],
                                        config.threshold, config.threshold_abs)
        curves = {f"FullFT seed {s}": (r.curves_path, "full") for s, r in zip(seeds, fulls, strict=True)}
        curves |= {f"LoRA r={config.rank} seed {s}": (r.curves_path, "lora") for s, r in zip(seeds, loras, strict=True)}
        chart = tasks.plot_runs(curves, str(reports / "curves.png"),
                                curves_title(config.model, config.dataset, comparison.verdict), comparison.base_loss)
        regret = {"regret_nats": comparison.regret_nats, "regret_low": comparison.regret_low,
                  "regret_high": comparison.regret_high, "regret_relative": comparison.regret_relative,
                  "allowed_regret_nats": comparison.allowed_regret_nats}
        verdict_tags = {"verdict": comparison.verdict, "passed": comparison.passed}
        tasks.log_files(settings, lora_runs[0], [chart], metrics=regret, tags=verdict_tags)

        registration = decision = None
        lora, full = loras[0], fulls[0]
        if comparison.passed:
            tags = {"base_model": config.model, "method": "lora", "rank": config.rank,
                    "targets": lora_config.targets, "dataset": config.dataset,
                    "dataset_fingerprint": data["fingerprint"], "eval_loss": lora.final_eval_loss,
                    "baseline_eval_loss": full.final_eval_loss, "regret": comparison.regret_nats,
                    "regret_low": comparison.regret_low, "regret_high": comparison.regret_high,
                    "relative_regret": comparison.regret_relative, "verdict": comparison.verdict,
                    "plan_verdict": plan["verdict"], "seeds": seeds, "code_version": code,
                    "mlflow_run_id": lora_runs[0]}
            registration = tasks.register_adapter(settings, lora_runs[0], lora.model_dir, config.model, config.name,
                                                  fingerprint, tags, str(runs / "registry-scratch"),
                                                  _description(config, lora_config, comparison, data, seeds))
            decision = tasks.promote_adapter(settings, registration, comparison.passed, lora.final_eval_loss)
        for run_id in lora_runs:
            tasks.end_tracking(settings, run_id)

    summary = {
        "name": config.name, "config": config.to_dict(), "code_version": code, "dataset": data,
        "plan": {k: plan[k] for k in ("verdict", "adapter_params", "summary", "files", "advised_lora_lr",
                                      "lr_warning")},
        "warnings": warnings, "seeds": seeds,
        "baseline": full.to_dict(), "baseline_cached": cached[0], "baselines_cached": cached, "lora": lora.to_dict(),
        "baselines": [r.to_dict() for r in fulls], "loras": [r.to_dict() for r in loras],
        "comparison": comparison.to_dict(), "chart": chart, "run_fingerprint": fingerprint,
        "registration": None if registration is None else dataclasses.asdict(registration),
        "promotion": None if decision is None else dataclasses.asdict(decision),
        "mlflow": {"tracking_uri": settings.tracking_uri, "experiment": config.experiment,
                   "parent_run_id": parent},
    }
    summary_path = tasks.write_json(str(reports / "summary.json"), summary)
    tasks.log_files(settings, parent, [summary_path, chart],
                    metrics=regret | {"lora_eval_loss": comparison.lora_final,
                                      "full_eval_loss": comparison.full_final},
                    tags=verdict_tags | {"verdict_message": comparison.message, "baseline_cached": cached[0],
                                         "registered_version": registration.version if registration else ""})
    tasks.record_verdict(comparison.verdict, comparison.message)
    tasks.end_tracking(settings, parent)
    return summary


def _run_config(config: PipelineConfig, method: str, runs: Path, data_fingerprint: str, code: str, seed: int):
    """The run's TrainConfig, writing to a folder named by its key, and the key."""
    key = tasks.run_key(config.train_config(method, seed=seed), data_fingerprint, code)
    folder = runs / (f"full-{key}" if method == "full" else f"lora-r{config.rank}-{key}")
    # overwrite: the folder is named by the run key, so what it holds is this very run's output.
    return config.train_config(method, output_dir=str(folder), overwrite=True, seed=seed), key


def _track_training(settings, config: PipelineConfig, train_config, result, parent: str, data: dict,
                    tags: dict) -> str:
    """A nested MLflow run for one training run, named so pipelines and replicates tell apart."""
    rank = f" r={train_config.rank}" if train_config.method == "lora" else ""
    name = f"{config.name} {train_config.method}{rank} lr={train_config.lr:g} seed={train_config.seed}"
    run_id = tasks.start_tracking(settings, config.experiment, name, train_config.to_dict(), parent)
    tasks.log_training(settings, run_id, result, tags)
    tasks.log_dataset(settings, run_id, config.dataset, data["fingerprint"])
    return run_id


def _description(config: PipelineConfig, lora_config, comparison, data: dict, seeds: list[int]) -> str:
    """The registered version's description: what a reviewer needs to trust the promotion."""
    interval = comparison.interval
    return (
        f"{comparison.verdict}: regret {comparison.regret_nats:+.4f} nats/token, {interval.confidence:.0%} interval "
        f"[{comparison.regret_low:+.4f}, {comparison.regret_high:+.4f}] (allowed {comparison.allowed_regret_nats:.4f}); "
        f"LoRA r={config.rank} lr={config.lora_lr:g} vs FullFT lr={config.full_lr:g}, {lora_config.max_steps} steps "
        f"x batch {lora_config.batch_size * lora_config.grad_accum_steps}, seeds {seeds}; data {config.dataset} "
        f"(fingerprint {data['fingerprint']}), {interval.examples} held-out examples, {interval.tokens} tokens."
    )


def _baseline(full_config, fingerprint: str, code: str, refresh: bool):
    """Run (or reuse) the cached baseline; retrain if the cached run's files were deleted."""
    state = tasks.train_baseline.with_options(refresh_cache=refresh or None)(
        full_config, fingerprint, code, return_state=True
    )
    result, cached = state.result(), state.name == "Cached"
    if cached and not Path(result.summary_path).is_file():
        result = tasks.train_baseline.with_options(refresh_cache=True)(full_config, fingerprint, code)
        cached = False
    return result, cached
