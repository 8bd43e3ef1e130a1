"""The one gated pipeline flow: plan → FullFT baseline (cached) → LoRA → compare → register → promote,
with a supervised or an RL objective (flows/objectives.py: what differs).

Each step is a task (flows/tasks.py); this module only wires them and decides where files go:
`runs/<name>/<prefix>full-<key>` and `runs/<name>/<prefix>lora-r<rank>-<key>` (prefix "" or "rl-",
key = `tasks.run_key`: what is trained, on which data, by which code), `reports/<name>/` for the plan
report, the chart and `summary.json`. With `seeds: [...]` (supervised) both methods are trained once
per seed and compared as paired replicates. Every run's config is resolved once, here, and handed to
the plan and the run. MLflow gets one experiment per pipeline (`lowregret/<name>`) with a parent run
per pipeline run and a nested run per step; the parent run and the Prefect flow run carry the gate's
verdict. Only a PASS registers (alias `candidate`) and may move `champion`.
"""

# No `from __future__ import annotations`: Prefect builds the flows' parameter models from these
# annotations when a deployment loads this file by path, where string annotations do not resolve.

from prefect import flow

from flows import tasks
from flows.config import PipelineConfig, RLPipelineConfig
from flows.locks import run_lock
from flows.objectives import objective_of
from flows.settings import configure_mlflow, load_settings
from flows.tracking import STATE_HOOKS


@flow(name="lowregret-plan")
def plan_report(config: PipelineConfig, workdir: str | None = None) -> dict:
    """Write the capacity-plan report of `config`'s LoRA run and nothing else."""
    settings = load_settings(workdir)
    tasks.check_inputs(config)
    return tasks.make_plan(config, config.train_config("lora"), str(settings.reports_dir / config.name / "plan"))


@flow(name="lowregret-pipeline", **STATE_HOOKS)
def pipeline(config: PipelineConfig | RLPipelineConfig, workdir: str | None = None) -> dict:
    """Train a LoRA adapter, prove it against a FullFT baseline, register and maybe promote it:
    supervised for a `PipelineConfig`, RL for an `RLPipelineConfig` (`lowregret pipeline` and
    `lowregret rl-pipeline` run this one flow).

    A failure, a crash (SIGTERM, Ctrl-C) or a cancellation ends the MLflow runs FAILED or KILLED
    (flows.tracking's state hooks). Identical pipelines (same run keys) take turns from training to
    registration (`run_lock`): they write one set of run folders and register one version.

    Returns:
        The pipeline summary (also written to reports/<name>/summary.json and logged to MLflow);
        `summary["comparison"]["verdict"]` is PASS, FAIL or INCONCLUSIVE.
    """
    objective = objective_of(config)
    settings = load_settings(workdir)
    configure_mlflow(settings)
    data = objective.check_inputs(config)
    code = tasks.code_version()
    runs, reports = settings.runs_dir / config.name, settings.reports_dir / config.name
    seeds = config.run_seeds
    planned = [{method: tasks.keyed_run(config, method, runs, data["fingerprint"], code, seed=seed)
                for method in ("full", "lora")} for seed in seeds]
    fingerprint = config.run_prefix + "-".join(f"{p['lora'][1]}-{p['full'][1]}" for p in planned)
    lora_config = planned[0]["lora"][0]

    parent = tasks.start_tracking(settings, config.experiment, f"{config.name} {objective.command}",
                                  config.to_dict(),
                                  tags={"code_version": code, "dataset_fingerprint": data["fingerprint"],
                                        "objective": objective.name})
    plan = objective.plan(config, lora_config, data, str(reports / "plan"))
    print(f"{plan['title']}:\n  " + "\n  ".join(plan["summary"]), flush=True)
    for warning in plan["warnings"]:
        print(f"warning: {warning}", flush=True)
    plan_run = tasks.start_tracking(settings, config.experiment, f"{config.name} plan", {"rank": config.rank},
                                    parent)
    tasks.log_files(settings, plan_run, list(plan["files"].values()), tags=plan["log_tags"],
                    metrics=plan["log_metrics"], artifact_path="plan")
    tasks.end_tracking(settings, plan_run)

    with run_lock(settings, fingerprint):
        fulls, loras, lora_runs, cached = [], [], [], []
        for (full_config, full_key), (train_config, lora_key) in ((p["full"], p["lora"]) for p in planned):
            full, was_cached = tasks.cached_baseline(full_config, data["fingerprint"], code, config.refresh_baseline)
            full_run = tasks.track_training(settings, config, full_config, full, parent, data["fingerprint"],
                                            {"cached": was_cached, "run_key": full_key})
            tasks.end_tracking(settings, full_run)
            lora = tasks.train_adapter(train_config)
            lora_runs.append(tasks.track_training(settings, config, train_config, lora, parent, data["fingerprint"],
                                                  {"run_key": lora_key}))
            fulls.append(full)
            loras.append(lora)
            cached.append(was_cached)

        comparison = objective.compare(config, loras, fulls)
        chart = objective.chart(config, seeds, loras, fulls, comparison, reports)
        gate = objective.gate_metrics(comparison)
        verdict_tags = {"verdict": comparison.verdict, "passed": comparison.passed}
        tasks.log_files(settings, lora_runs[0], [chart], metrics=gate, tags=verdict_tags)

        registration = decision = None
        lora, full = loras[0], fulls[0]
        if comparison.passed:
            tags = {"base_model": config.model, "method": "lora", "rank": config.rank,
                    "targets": lora_config.targets, "dataset": config.dataset,
                    "dataset_fingerprint": data["fingerprint"], **objective.registry_tags(config, lora, full, comparison),
                    "verdict": comparison.verdict, "plan_verdict": plan["verdict"], "seeds": seeds,
                    "code_version": code, "mlflow_run_id": lora_runs[0]}
            registration = tasks.register_adapter(
                settings, lora_runs[0], lora.model_dir, config.model, config.name, fingerprint, tags,
                str(runs / "registry-scratch"), objective.description(config, lora_config, comparison, data, seeds))
            decision = tasks.promote_adapter(settings, registration, comparison.passed, **objective.promote_score(lora))
        for run_id in lora_runs:
            tasks.end_tracking(settings, run_id)

    fields = {
        "objective": objective.name, "dataset": data, "plan": objective.summary_plan(plan),
        "warnings": plan["warnings"], "seeds": seeds,
        "baseline": full.to_dict(), "baseline_cached": cached[0], "baselines_cached": cached, "lora": lora.to_dict(),
        "baselines": [r.to_dict() for r in fulls], "loras": [r.to_dict() for r in loras],
        "comparison": comparison.to_dict(), "chart": chart, "run_fingerprint": fingerprint,
    }
    return tasks.close_pipeline(
        settings, parent, reports, config, code, fields, registration, decision, [chart],
        metrics=gate | objective.final_metrics(comparison, lora, full),
        tags=verdict_tags | {"verdict_message": comparison.message, "baseline_cached": cached[0],
                             "registered_version": registration.version if registration else ""},
        verdict=comparison.verdict, message=comparison.message)
