"""What the one gated pipeline (flows/pipeline.py) does differently for a supervised and an RL
objective: the input check, the capacity plan, the comparison and its chart, the gate's metrics, the
registry's tags and the promotion's score. Everything else (the run keys, the cached baseline, the
adapter run, tracking, the lock, registration, promotion, the summary) is one code path.

`objective_of(config)` picks the objective from the config's type: a `PipelineConfig` is supervised
(held-out loss regret against a relative threshold, seed replicates), an `RLPipelineConfig` is RL
(held-out reward regret against an absolute allowance).
"""

# No `from __future__ import annotations`: Prefect builds the tasks' parameter models from these
# annotations when a deployment loads this file by path, where string annotations do not resolve.
import json
from pathlib import Path

from prefect import task

from flows import tasks
from flows.config import PipelineConfig, RLPipelineConfig


class Supervised:
    """Held-out log loss: LoRA's regret in nats per completion token, seeds paired."""

    name = "supervised"
    command = "pipeline"

    def check_inputs(self, config) -> dict:
        return tasks.check_inputs(config)

    def plan(self, config, lora, data: dict, out_dir: str) -> dict:
        from evaluation.compare import design_warnings

        plan = tasks.make_plan(config, lora, out_dir)
        warnings = design_warnings(lora.max_steps, data["held_out_examples"])
        warnings += [f"LR: {plan['lr_warning']}"] if plan["lr_warning"] else []
        return plan | {"title": "Capacity plan", "warnings": warnings,
                       "log_tags": {"verdict": plan["verdict"], "lr_warning": plan["lr_warning"] or ""},
                       "log_metrics": {"adapter_params": plan["adapter_params"],
                                       "advised_lora_lr": plan["advised_lora_lr"], "lora_lr": config.lora_lr}}

    def summary_plan(self, plan: dict) -> dict:
        return {k: plan[k] for k in ("verdict", "adapter_params", "summary", "files", "advised_lora_lr", "lr_warning")}

    def compare(self, config, loras: list, fulls: list):
        return tasks.compare_runs([r.output_dir for r in loras], [r.output_dir for r in fulls],
                                  config.threshold, config.threshold_abs)

    def chart(self, config, seeds: list, loras: list, fulls: list, comparison, reports: Path) -> str:
        from evaluation.curves import curves_title

        curves = {f"FullFT seed {s}": (r.curves_path, "full") for s, r in zip(seeds, fulls, strict=True)}
        curves |= {f"LoRA r={config.rank} seed {s}": (r.curves_path, "lora") for s, r in zip(seeds, loras, strict=True)}
        return tasks.plot_runs(curves, str(reports / "curves.png"),
                               curves_title(config.model, config.dataset, comparison.verdict), comparison.base_loss)

    def gate_metrics(self, comparison) -> dict:
        return {"regret_nats": comparison.regret_nats, "regret_low": comparison.regret_low,
                "regret_high": comparison.regret_high, "regret_relative": comparison.regret_relative,
                "allowed_regret_nats": comparison.allowed_regret_nats}

    def final_metrics(self, comparison, lora, full) -> dict:
        return {"lora_eval_loss": comparison.lora_final, "full_eval_loss": comparison.full_final}

    def registry_tags(self, config, lora, full, comparison) -> dict:
        return {"eval_loss": lora.final_eval_loss, "baseline_eval_loss": full.final_eval_loss,
                "regret": comparison.regret_nats, "regret_low": comparison.regret_low,
                "regret_high": comparison.regret_high, "relative_regret": comparison.regret_relative}

    def promote_score(self, lora) -> dict:
        return {"eval_loss": lora.final_eval_loss}

    def description(self, config, lora_config, comparison, data: dict, seeds: list) -> str:
        """The registered version's description: what a reviewer needs to trust the promotion."""
        interval = comparison.interval
        return (
            f"{comparison.verdict}: regret {comparison.regret_nats:+.4f} nats/token, {interval.confidence:.0%} "
            f"interval [{comparison.regret_low:+.4f}, {comparison.regret_high:+.4f}] (allowed "
            f"{comparison.allowed_regret_nats:.4f}); LoRA r={config.rank} lr={config.lora_lr:g} vs FullFT "
            f"lr={config.full_lr:g}, {lora_config.max_steps} steps x batch "
            f"{lora_config.batch_size * lora_config.grad_accum_steps}, seeds {seeds}; data {config.dataset} "
            f"(fingerprint {data['fingerprint']}), {interval.examples} held-out examples, {interval.tokens} tokens."
        )


class RL:
    """Held-out greedy reward: LoRA's regret in reward units (accuracy for a pass/fail reward)."""

    name = "rl"
    command = "rl-pipeline"

    def check_inputs(self, config) -> dict:
        return check_rl_inputs(config)

    def plan(self, config, lora, data: dict, out_dir: str) -> dict:
        plan = make_rl_plan(config, lora, out_dir)
        return plan | {"title": "Capacity plan (RL)", "warnings": [], "log_tags": {"verdict": plan["verdict"]},
                       "log_metrics": {"adapter_params": plan["adapter_params"]}}

    def summary_plan(self, plan: dict) -> dict:
        return {k: plan[k] for k in ("verdict", "adapter_params", "smallest_rank", "summary", "files")}

    def compare(self, config, loras: list, fulls: list):
        return compare_rl_runs(loras[0].output_dir, fulls[0].output_dir, config.allowed_regret)

    def chart(self, config, seeds: list, loras: list, fulls: list, comparison, reports: Path) -> str:
        return plot_rl_runs({"FullFT": fulls[0].curves_path, f"LoRA r={config.rank}": loras[0].curves_path},
                            str(reports / "rewards.png"))

    def gate_metrics(self, comparison) -> dict:
        return {"reward_regret": comparison.regret, "reward_regret_low": comparison.low,
                "reward_regret_high": comparison.high, "allowed_reward_regret": comparison.allowed_regret}

    def final_metrics(self, comparison, lora, full) -> dict:
        return {"lora_eval_reward": lora.final_eval_reward, "full_eval_reward": full.final_eval_reward}

    def registry_tags(self, config, lora, full, comparison) -> dict:
        return {"objective": "rl", "reward": config.reward, "eval_reward": lora.final_eval_reward,
                "eval_accuracy": lora.final_eval_accuracy, "baseline_eval_reward": full.final_eval_reward,
                "reward_regret": comparison.regret}

    def promote_score(self, lora) -> dict:
        return {"eval_reward": lora.final_eval_reward}

    def description(self, config, lora_config, comparison, data: dict, seeds: list) -> str:
        return (f"{comparison.message} LoRA r={config.rank} lr={config.lora_lr:g} vs FullFT lr={config.full_lr:g}, "
                f"{lora_config.max_steps} steps x {lora_config.prompts_per_step} prompts x {lora_config.group_size} "
                f"samples; reward {config.reward}; data {config.dataset} (fingerprint {data['fingerprint']}).")


def objective_of(config) -> Supervised | RL:
    """The objective of a pipeline config (see the module docstring)."""
    if isinstance(config, RLPipelineConfig):
        return RL()
    if isinstance(config, PipelineConfig):
        return Supervised()
    raise TypeError(f"not a pipeline config: {type(config).__name__}")


# ------------------------------------------------------------------------------- RL's tasks


@task
def check_rl_inputs(config: RLPipelineConfig) -> dict:
    """`flows.preflight.check_rl_inputs` as the flow's first step (the command ran it already, before
    Prefect started; a scheduled run is checked here)."""
    from flows.preflight import check_rl_inputs as check

    return check(config)


@task
def make_rl_plan(config: RLPipelineConfig, lora, out_dir: str) -> dict:
    """Capacity plan of the LoRA RL run `lora` (episodes x reward entropy against the adapter), as a report."""
    from planner.plan import build_plan
    from planner.profile import profile_rl
    from planner.report import write_report
    from planner.report_text import summary_lines

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
