"""The RL pipeline flow: plan → FullFT RL baseline (cached) → LoRA RL → compare rewards → register → promote.

The RL counterpart of flows/pipeline.py, with the same layout: runs in `runs/<name>/rl-full-<key>`
and `runs/<name>/rl-lora-r<rank>-<key>`, the plan report, the reward chart and `summary.json` in
`reports/<name>/`, one MLflow experiment per name with a parent run and a nested run per step; the
parent run and the Prefect flow run carry the verdict. Training (the cached baseline and the adapter),
tracking, registration, promotion and the verdict record are flows/tasks.py's, shared with the
supervised pipeline; the tasks below are what RL does differently (inputs, plan, reward comparison).
"""

# No `from __future__ import annotations`: Prefect builds the flow's parameter model from these
# annotations, and string annotations do not resolve when a deployment loads this file by path.
import json
from pathlib import Path

from prefect import flow, task

from flows import tasks
from flows.config import RLPipelineConfig
from flows.locks import run_lock
from flows.settings import configure_mlflow, load_settings
from flows.tracking import STATE_HOOKS


@task
def check_rl_inputs(config: RLPipelineConfig) -> dict:
    """`flows.preflight.check_rl_inputs` as the flow's first step (the command ran it already, before
    Prefect started; a scheduled run is checked here)."""
    from flows.preflight import check_rl_inputs as check

    return check(config)


@task
def make_rl_plan(config: RLPipelineConfig, out_dir: str) -> dict:
    """Capacity plan of the LoRA RL run (episodes × reward entropy against the adapter), as a report."""
    from planner.plan import build_plan
    from planner.profile import profile_rl
    from planner.report import write_report
    from planner.report_text import summary_lines

    lora = config.train_config("lora")
    plan = build_plan(config.model, config.rank, targets=lora.targets, expert_rank_divisor=lora.expert_rank_divisor,
                      target_unembedding=lora.target_unembedding,
                      profile=profile_rl(lora.episodes, config.reward_entropy_bits),
                      seq_len=lora.max_prompt_tokens + lora.max_new_tokens,
                      batch_size=lora.prompts_per_step * lora.group_size, gpu=config.gpu, fullft_lr=config.full_lr,
                      steps=lora.max_steps)
    files = write_report(plan, out_dir)
    return {"verdict": plan.capacity.verdict, "adapter_params": plan.adapter_params,
            "smallest_rank": plan.capacity.min_rank_pow2, "summary": summary_lines(plan),
            "files": {name: str(path) for name, path in files.items()}}


@task
def compare_rl_runs(lora_dir: str, full_dir: str, allowed_regret: float):
    """Reward regret of the LoRA run against the baseline, paired over the held-out prompts."""
    from evaluation.rl import compare_rl_runs as compare

    return compare(lora_dir, full_dir, allowed_regret=allowed_regret)


@task
def plot_rl_runs(curves_paths: dict[str, str], path: str) -> str:
    """The accuracy and reward chart of both runs."""
    from evaluation.rl import plot_rewards

    plot_rewards({name: json.loads(Path(p).read_text()) for name, p in curves_paths.items()}, path)
    return path


@flow(name="lowregret-rl-pipeline", **STATE_HOOKS)
def rl_pipeline(config: RLPipelineConfig, workdir: str | None = None) -> dict:
    """Train a LoRA adapter with RL, compare its held-out reward with a FullFT RL baseline, register and
    maybe promote it.

    Failures, crashes and cancellations end the MLflow runs as in the supervised pipeline (state
    hooks), and identical pipelines take turns from training to registration (`run_lock`).

    Returns:
        The pipeline summary (also written to reports/<name>/summary.json and logged to MLflow).
    """
    settings = load_settings(workdir)
    configure_mlflow(settings)
    data = check_rl_inputs(config)
    code = tasks.code_version()
    runs, reports = settings.runs_dir / config.name, settings.reports_dir / config.name
    (full_config, full_key), (lora_config, lora_key) = (
        tasks.keyed_run(config, method, runs, data["fingerprint"], code) for method in ("full", "lora"))
    fingerprint = f"rl-{lora_key}-{full_key}"

    parent = tasks.start_tracking(settings, config.experiment, f"{config.name} rl-pipeline", config.to_dict(),
                                  tags={"code_version": code, "dataset_fingerprint": data["fingerprint"]})
    plan = make_rl_plan(config, str(reports / "plan"))
    print("Capacity plan (RL):\n  " + "\n  ".join(plan["summary"]), flush=True)
    plan_run = tasks.start_tracking(settings, config.experiment, f"{config.name} plan", {"rank": config.rank},
                                    parent)
    tasks.log_files(settings, plan_run, list(plan["files"].values()), tags={"verdict": plan["verdict"]},
                    metrics={"adapter_params": plan["adapter_params"]}, artifact_path="plan")
    tasks.end_tracking(settings, plan_run)

    with run_lock(settings, fingerprint):
        full, cached = tasks.cached_baseline(full_config, data["fingerprint"], code, config.refresh_baseline)
        full_run = tasks.track_training(settings, config, full_config, full, parent, data["fingerprint"],
                                        {"cached": cached, "run_key": full_key})
        tasks.end_tracking(settings, full_run)

        lora = tasks.train_adapter(lora_config)
        lora_run = tasks.track_training(settings, config, lora_config, lora, parent, data["fingerprint"],
                                        {"run_key": lora_key})

        comparison = compare_rl_runs(lora.output_dir, full.output_dir, config.allowed_regret)
        chart = plot_rl_runs({"FullFT": full.curves_path, f"LoRA r={config.rank}": lora.curves_path},
                             str(reports / "rewards.png"))
        regret = {"reward_regret": comparison.regret, "reward_regret_low": comparison.low,
                  "reward_regret_high": comparison.high, "allowed_reward_regret": comparison.allowed_regret}
        tasks.log_files(settings, lora_run, [chart], metrics=regret,
                        tags={"verdict": comparison.verdict, "passed": comparison.passed})

        registration = decision = None
        if comparison.passed:
            tags = {"base_model": config.model, "method": "lora", "objective": "rl", "rank": config.rank,
                    "targets": lora_config.targets, "dataset": config.dataset, "reward": config.reward,
                    "dataset_fingerprint": data["fingerprint"], "eval_reward": lora.final_eval_reward,
                    "eval_accuracy": lora.final_eval_accuracy, "baseline_eval_reward": full.final_eval_reward,
                    "reward_regret": comparison.regret, "verdict": comparison.verdict,
                    "plan_verdict": plan["verdict"], "code_version": code, "mlflow_run_id": lora_run}
            registration = tasks.register_adapter(settings, lora_run, lora.model_dir, config.model, config.name,
                                                  fingerprint, tags, str(runs / "registry-scratch"))
            decision = tasks.promote_adapter(settings, registration, comparison.passed,
                                             eval_reward=lora.final_eval_reward)
        tasks.end_tracking(settings, lora_run)

    fields = {
        "objective": "rl", "dataset": data,
        "plan": {k: plan[k] for k in ("verdict", "adapter_params", "smallest_rank", "summary", "files")},
        "baseline": full.to_dict(), "baseline_cached": cached, "lora": lora.to_dict(),
        "comparison": comparison.to_dict(), "chart": chart, "run_fingerprint": fingerprint,
    }
    return tasks.close_pipeline(
        settings, parent, reports, config, code, fields, registration, decision, [chart],
        metrics=regret | {"lora_eval_reward": lora.final_eval_reward, "full_eval_reward": full.final_eval_reward},
        tags={"verdict_message": comparison.message, "baseline_cached": cached,
              "registered_version": registration.version if registration else ""},
        verdict=comparison.verdict, message=comparison.message)
