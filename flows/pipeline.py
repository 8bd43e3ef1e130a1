"""The pipeline flow: plan → FullFT baseline (cached) → LoRA → compare → register → promote.

Each step is a task (flows/tasks.py); this module only wires them and decides where files go:
`runs/<name>/full-<key>` and `runs/<name>/lora-r<rank>-<key>` (key = `tasks.run_key`: what is
trained, on which data, by which code), `reports/<name>/` for the plan report, the chart and
`summary.json`. MLflow gets one experiment per pipeline (`lowregret/<name>`) with a parent run
per pipeline run and a nested run per step.
"""

# No `from __future__ import annotations`: Prefect builds the flows' parameter models from these
# annotations when a deployment loads this file by path, where string annotations do not resolve.
import dataclasses
from pathlib import Path

from prefect import flow

from evaluation.curves import curves_title
from flows import tasks
from flows.config import PipelineConfig
from flows.settings import configure_mlflow, load_settings


@flow(name="lowregret-plan")
def plan_report(config: PipelineConfig, workdir: str | None = None) -> dict:
    """Write the capacity-plan report of `config`'s LoRA run and nothing else."""
    settings = load_settings(workdir)
    tasks.check_inputs(config)
    return tasks.make_plan(config, str(settings.reports_dir / config.name / "plan"))


@flow(name="lowregret-pipeline")
def pipeline(config: PipelineConfig, workdir: str | None = None) -> dict:
    """Train a LoRA adapter, prove it against a FullFT baseline, register and maybe promote it.

    Returns:
        The pipeline summary (also written to reports/<name>/summary.json and logged to MLflow).
    """
    settings = load_settings(workdir)
    configure_mlflow(settings)
    data = tasks.check_inputs(config)
    code = tasks.code_version()
    runs, reports = settings.runs_dir / config.name, settings.reports_dir / config.name
    (full_config, full_key), (lora_config, lora_key) = (
        _run_config(config, method, runs, data["fingerprint"], code) for method in ("full", "lora"))
    fingerprint = f"{lora_key}-{full_key}"

    parent = tasks.start_tracking(settings, config.experiment, "pipeline", config.to_dict(),
                                  tags={"code_version": code, "dataset_fingerprint": data["fingerprint"]})
    try:
        plan = tasks.make_plan(config, str(reports / "plan"))
        print("Capacity plan:\n  " + "\n  ".join(plan["summary"]), flush=True)
        plan_run = tasks.start_tracking(settings, config.experiment, "plan", {"rank": config.rank}, parent)
        tasks.log_files(settings, plan_run, list(plan["files"].values()), tags={"verdict": plan["verdict"]},
                        metrics={"adapter_params": plan["adapter_params"]}, artifact_path="plan")
        tasks.end_tracking(settings, plan_run)

        full, cached = _baseline(full_config, data["fingerprint"], code, config.refresh_baseline)
        full_run = tasks.start_tracking(settings, config.experiment, "full", full_config.to_dict(), parent)
        tasks.log_training(settings, full_run, full, {"cached": cached, "run_key": full_key})
        tasks.end_tracking(settings, full_run)

        lora = tasks.train_adapter(lora_config)
        lora_run = tasks.start_tracking(settings, config.experiment, "lora", lora_config.to_dict(), parent)
        tasks.log_training(settings, lora_run, lora, {"run_key": lora_key})

        comparison = tasks.compare_runs(lora.output_dir, full.output_dir, config.threshold, config.threshold_abs)
        chart = tasks.plot_runs({"FullFT": (full.curves_path, "full"), f"LoRA r={config.rank}": (lora.curves_path, "lora")},
                                str(reports / "curves.png"), curves_title(config.model, config.dataset, comparison.verdict),
                                comparison.base_loss)
        regret = {"regret_nats": comparison.regret_nats, "regret_relative": comparison.regret_relative,
                  "allowed_regret_nats": comparison.allowed_regret_nats}
        tasks.log_files(settings, lora_run, [chart], metrics=regret, tags={"passed": comparison.passed})

        registration = decision = None
        if comparison.passed:
            tags = {"base_model": config.model, "method": "lora", "rank": config.rank,
                    "targets": lora_config.targets, "dataset": config.dataset,
                    "dataset_fingerprint": data["fingerprint"], "eval_loss": lora.final_eval_loss,
                    "baseline_eval_loss": full.final_eval_loss, "regret": comparison.regret_nats,
                    "relative_regret": comparison.regret_relative, "plan_verdict": plan["verdict"],
                    "code_version": code, "mlflow_run_id": lora_run}
            registration = tasks.register_adapter(settings, lora_run, lora.model_dir, config.model, config.name,
                                                  fingerprint, tags, str(runs / "registry-scratch"))
            decision = tasks.promote_adapter(settings, registration, comparison.passed, lora.final_eval_loss)
        tasks.end_tracking(settings, lora_run)

        summary = {
            "name": config.name, "config": config.to_dict(), "code_version": code, "dataset": data,
            "plan": {k: plan[k] for k in ("verdict", "adapter_params", "summary", "files")},
            "baseline": full.to_dict(), "baseline_cached": cached, "lora": lora.to_dict(),
            "comparison": comparison.to_dict(), "chart": chart, "run_fingerprint": fingerprint,
            "registration": None if registration is None else dataclasses.asdict(registration),
            "promotion": None if decision is None else dataclasses.asdict(decision),
            "mlflow": {"tracking_uri": settings.tracking_uri, "experiment": config.experiment,
                       "parent_run_id": parent},
        }
        summary_path = tasks.write_json(str(reports / "summary.json"), summary)
        tasks.log_files(settings, parent, [summary_path, chart],
                        metrics=regret | {"lora_eval_loss": lora.final_eval_loss,
                                          "full_eval_loss": full.final_eval_loss},
                        tags={"passed": comparison.passed, "baseline_cached": cached,
                              "registered_version": registration.version if registration else ""})
        tasks.end_tracking(settings, parent)
        return summary
    except BaseException:
        tasks.end_tracking(settings, parent, "FAILED")
        raise


def _run_config(config: PipelineConfig, method: str, runs: Path, data_fingerprint: str, code: str):
    """The run's TrainConfig, writing to a folder named by its key, and the key."""
    key = tasks.run_key(config.train_config(method), data_fingerprint, code)
    folder = runs / (f"full-{key}" if method == "full" else f"lora-r{config.rank}-{key}")
    # overwrite: the folder is named by the run key, so what it holds is this very run's output.
    return config.train_config(method, output_dir=str(folder), overwrite=True), key


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
