"""`RLConfig` and `RLResult`: one policy-gradient RL run with a verifiable reward (torch-free).

Validated like `TrainConfig` (same type coercion, same YAML reader and `key=value` overrides), so a
bad value is a `UserError` before any work. Presets live in `configs/rl/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from data.config_kit import load
from data.errors import UserError
from trainer.config import RunConfig
from trainer.result import RunResult
from trainer.rewards import parse_reward

# The built-in task: integer addition that SmolLM2-135M-Instruct partly solves (docs/RL.md).
DEFAULT_RL_DATASET = "builtin:arithmetic"
#: Each held-out prompt's greedy reward at each evaluated step (evaluation/rl.py pairs runs by it).


@dataclass
class RLConfig(RunConfig):
    """One RL run: GRPO-style policy gradient, LoRA (rank 1 by default) or FullFT: `RunConfig`'s options
    (some with RL defaults) and the ones below. Units in comments."""

    #: Prompts with answers: rows with `prompt` (text, or a list of chat messages) and `answer`.
    dataset: str = DEFAULT_RL_DATASET
    #: LoRA rank; 1 because an RL episode carries <= 1 bit (pass/fail), and rank 1 matched FullFT in the paper.
    rank: int = 1
    #: Optimizer steps (one on-policy update per batch of prompts).
    max_steps: int = 50
    #: Greedy held-out evaluations at log-spaced steps, including step 0 (base model) and the last step.
    eval_points: int = 6
    #: Held-out prompts evaluated (the first N of the held-out set); None = all.
    eval_max_examples: int | None = 200
    #: Save a resumable checkpoint every N steps; 0 = never.
    checkpoint_every: int = 10
    #: exact | regex:<pattern> | python:<module>:<function> (runs your code); see trainer/rewards.py.
    reward: str = "exact"
    #: Prompts per step; each is sampled `group_size` times. 8 x 8 = 64 episodes per step.
    prompts_per_step: int = 8
    #: Samples per prompt (the group whose mean reward is the baseline); >= 2.
    group_size: int = 8
    #: Divide each advantage by its group's reward std (GRPO); off = reward minus group mean only (Dr. GRPO).
    scale_rewards: bool = False
    #: Tokens sampled per completion at most; the built-in task's answers need 1-3.
    max_new_tokens: int = 8
    #: Prompt tokens at most (after the chat template); longer prompts are refused before training.
    max_prompt_tokens: int = 256
    #: Sequences per forward/backward chunk of a step's episodes (bounds memory, not the math).
    micro_batch_size: int = 64

    RANGES: ClassVar[dict] = {"prompts_per_step": (None, 2**16), "group_size": (None, 2**12),
                              "max_new_tokens": (None, 2**16), "max_prompt_tokens": (None, 2**20),
                              "micro_batch_size": (None, 2**16)}
    _kind: ClassVar[str] = "RL"
    _output_prefix: ClassVar[str] = "rl-"

    def _validate_own(self) -> None:
        parse_reward(self.reward)
        for name in ("prompts_per_step", "max_new_tokens", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}: must be at least 1.")
        world = self.launch.world_size
        if world != "auto" and self.prompts_per_step % world:
            raise UserError(
                f"prompts_per_step={self.prompts_per_step} does not divide among {world} processes: each process "
                f"samples whole groups of the same number of prompts. Use a multiple of {world} "
                f"(e.g. prompts_per_step={world * max(1, round(self.prompts_per_step / world))}) or fewer processes."
            )
        if self.group_size < 2:
            raise UserError(
                f"group_size={self.group_size}: the advantage is the reward minus its group's mean, so a group "
                "needs at least 2 samples (8 is usual)."
            )
        if self.max_prompt_tokens < 2:
            raise UserError(f"max_prompt_tokens={self.max_prompt_tokens}: must be at least 2.")

    @property
    def episodes(self) -> int:
        """Sampled completions over the run: steps x prompts per step x group size."""
        return self.max_steps * self.prompts_per_step * self.group_size


def load_rl_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RLConfig:
    """Read an RL YAML preset (or start from the defaults) and apply `key=value` overrides.

    Raises:
        UserError: missing file, malformed YAML or override, unknown key, or an invalid value.
    """
    return load(RLConfig, path, overrides, RLConfig._kind)


@dataclass(frozen=True)
class RLResult(RunResult):
    """What a finished RL run produced. Rewards are means over episodes or held-out prompts.

    Attributes:
        method: "lora" or "full".
        output_dir, model_dir, curves_path, summary_path, scores_path: the run's files
            (model_dir: the peft adapter dir for LoRA, the saved model for full; scores_path: each
            held-out prompt's greedy reward at each evaluated step).
        base_eval_reward, base_eval_accuracy: greedy held-out mean reward / accuracy at step 0.
        final_eval_reward, final_eval_accuracy: the same after the last step.
        final_train_reward: mean sampled reward of the last step's episodes (before its update).
        steps, episodes: optimizer steps and sampled completions.
        completion_tokens: sampled tokens over the run (up to and including each end token).
        wall_s: wall time of the train call that finished the run (seconds).
        sample_tokens_per_s: sampled completion tokens per second of generation.
        train_tokens_per_s: prompt + completion tokens per second of the policy-gradient passes.
        peak_memory_bytes, peak_memory_kind: as in `TrainResult`.
        trainable_params: parameters updated by the optimizer (adapter only for LoRA).
        config_hash: `RLConfig.hash(data fingerprint)`.
    """

    method: str
    output_dir: str
    model_dir: str
    curves_path: str
    summary_path: str
    scores_path: str
    base_eval_reward: float
    base_eval_accuracy: float
    final_eval_reward: float
    final_eval_accuracy: float
    final_train_reward: float
    steps: int
    episodes: int
    completion_tokens: int
    wall_s: float
    sample_tokens_per_s: float
    train_tokens_per_s: float
    peak_memory_bytes: int
    peak_memory_kind: str
    trainable_params: int
    config_hash: str
