"""Reward regret of an RL-trained LoRA against FullFT, paired over held-out prompts.

Both runs are scored greedily on the identical held-out prompts at log-spaced steps (trainer/rl.py
writes each prompt's reward to the run's `eval_scores.json`). With r_i the final greedy reward of prompt i:

    regret    = mean_i (r_i^FullFT − r_i^LoRA)     (reward units; for a pass/fail reward, accuracy)
    recovered = Σ (r^LoRA − r^base) / Σ (r^FullFT − r^base)

Positive regret means LoRA trails. The interval and the verdict are `evaluation.regret`'s (the one
paired bootstrap: whole prompts are resampled with both runs' rewards together, so how hard each
prompt is cancels): the reward is passed as a negative loss with one "token" per prompt, which
makes its ratio statistic the mean difference above. PASS when the whole interval is within the
allowed regret, FAIL when all of it is above, INCONCLUSIVE otherwise (with the number of held-out
prompts that would likely decide it). Like the SFT regret, the interval covers the choice of
prompts, not training noise (sampling and seed): only replicate runs measure that.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from data.errors import UserError
from evaluation.runs import RL, RunRecord, load_run, paired_losses

#: LoRA's final held-out reward may trail FullFT's by this much and still PASS (5 points of accuracy
#: for a pass/fail reward). A product default, not a finding: set it from the seed spread of your task.
DEFAULT_ALLOWED_REWARD_REGRET = 0.05


@dataclass(frozen=True)
class RewardComparison:
    """LoRA's reward regret against FullFT on the same held-out prompts, with its interval and verdict."""

    lora_reward: float
    full_reward: float
    base_reward: float
    lora_accuracy: float
    full_accuracy: float
    base_accuracy: float
    regret: float
    low: float
    high: float
    confidence: float
    recovered: float | None
    recovered_low: float | None
    recovered_high: float | None
    allowed_regret: float
    verdict: str
    prompts: int
    prompts_needed: int | None
    matched: tuple = ()
    """(step, LoRA mean reward, FullFT mean reward) at every step > 0 both runs evaluated."""
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"passed": self.passed}


def compare_rewards(lora: RunRecord, full: RunRecord, *, allowed_regret: float = DEFAULT_ALLOWED_REWARD_REGRET
                    ) -> RewardComparison:
    """The paired reward regret of `lora` against `full` at their last evaluations.

    Raises:
        UserError: `check_comparable` refuses the runs, or `allowed_regret` is negative.
    """
    import numpy as np

    from evaluation.regret import decide, regret_interval

    if not allowed_regret >= 0:
        raise UserError(f"allowed regret {allowed_regret}: must be >= 0 (0.05 = 5 points of accuracy).")
    from trainer.rewards import SOLVED_REWARD

    # A reward is a negative loss, one "token" per prompt (`paired_losses`): regret_interval's
    # Σ(L − F)/Σn is then mean(r_full − r_lora), and its "recovered" Σ(B − L)/Σ(B − F) the share of
    # FullFT's gain.
    held_out, _, _ = paired_losses([lora], [full])
    interval = regret_interval(held_out.tokens, held_out.lora, held_out.full, held_out.base)
    lora_rewards, full_rewards = lora.scores.by_step, full.scores.by_step
    lora_r, full_r = -np.array(held_out.lora[0]), -np.array(held_out.full[0])
    base_r = -np.array(held_out.base)
    verdict = decide(interval, allowed_regret)
    matched = tuple((step, float(np.mean(lora_rewards[step])), float(np.mean(full_rewards[step])))
                    for step in sorted(lora_rewards) if step > 0 and step in full_rewards)
    comparison = RewardComparison(
        lora_reward=float(lora_r.mean()), full_reward=float(full_r.mean()), base_reward=float(base_r.mean()),
        lora_accuracy=float((lora_r >= SOLVED_REWARD).mean()), full_accuracy=float((full_r >= SOLVED_REWARD).mean()),
        base_accuracy=float((base_r >= SOLVED_REWARD).mean()),
        regret=interval.regret_nats, low=interval.low, high=interval.high, confidence=interval.confidence,
        recovered=interval.recovered, recovered_low=interval.recovered_low, recovered_high=interval.recovered_high,
        allowed_regret=allowed_regret, verdict=verdict.label, prompts=len(lora_r),
        prompts_needed=verdict.examples_needed, matched=matched,
    )
    return dataclasses.replace(comparison, message=_message(comparison))


def compare_rl_runs(lora_dir: str | Path, full_dir: str | Path, *,
                    allowed_regret: float = DEFAULT_ALLOWED_REWARD_REGRET) -> RewardComparison:
    """`compare_rewards` on two RL output directories."""
    return compare_rewards(load_run(lora_dir, RL), load_run(full_dir, RL), allowed_regret=allowed_regret)


def _message(c: RewardComparison) -> str:
    span = f"{c.confidence:.0%} interval [{c.low:+.3f}, {c.high:+.3f}] over {c.prompts} held-out prompts"
    head = f"{c.verdict}: LoRA's held-out reward trails FullFT's by {c.regret:+.3f} ({span}; allowed {c.allowed_regret:.3f})."
    if c.verdict == "PASS":
        return head + " LoRA matches FullFT on this task."
    if c.verdict == "FAIL":
        return head + " Check LoRA's learning rate (~10x FullFT's) before raising the rank."
    needed = (f" About {c.prompts_needed} held-out prompts would likely decide it." if c.prompts_needed
              else " More prompts alone cannot decide it: the regret sits at the threshold.")
    return head + needed


def format_comparison(c: RewardComparison) -> str:
    """The terminal table: base, FullFT and LoRA held-out reward and accuracy, then the verdict."""
    rows = [f"{'run':<12}{'held-out reward':>17}{'accuracy':>10}",
            f"{'base model':<12}{c.base_reward:>17.3f}{c.base_accuracy:>10.3f}",
            f"{'FullFT':<12}{c.full_reward:>17.3f}{c.full_accuracy:>10.3f}",
            f"{'LoRA':<12}{c.lora_reward:>17.3f}{c.lora_accuracy:>10.3f}"]
    if c.recovered is not None and math.isfinite(c.recovered):
        if c.recovered_low is None:
            bounds = ""
        elif math.isfinite(c.recovered_low) and math.isfinite(c.recovered_high):
            bounds = f" [{c.recovered_low:.2f}, {c.recovered_high:.2f}]"
        else:  # some resamples of the prompts hold no FullFT gain at all: the ratio has no bound
            bounds = " (interval unbounded: FullFT's gain is too small on these prompts)"
        rows.append(f"LoRA recovered {c.recovered:.2f}{bounds} of FullFT's gain over the base model")
    return "\n".join(rows + [c.message])


def plot_rewards(runs: dict[str, dict], path: str | Path, *, title: str = "RL: held-out greedy accuracy") -> Path:
    """Held-out accuracy (bold, markers) and each step's mean sampled reward (faint) per run, one PNG.

    Args:
        runs: label -> the run's curves.json record (`eval_accuracy`, `train_reward`).
        path: where to write the PNG; parent folders are created.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, curves) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        if curves.get("train_reward"):
            steps, values = zip(*curves["train_reward"], strict=True)
            ax.plot(steps, values, color=colour, alpha=0.35, linewidth=1, label=f"{label}: mean sampled reward")
        if curves.get("eval_accuracy"):
            steps, values = zip(*curves["eval_accuracy"], strict=True)
            ax.plot(steps, values, color=colour, linewidth=2.2, marker="o", markersize=4,
                    label=f"{label}: held-out accuracy (greedy)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("accuracy / reward")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
