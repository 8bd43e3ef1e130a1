"""`TrainResult`: the small record a training run hands to the next step (torch-free); `RunResult`,
its summary.json round trip, shared with `trainer.rl_config.RLResult`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The one per-example held-out score file, written by both trainers (trainer/loop.py, trainer/rl.py)
# next to curves.json and read by `evaluation.runs` for the paired comparison of `compare` and
# `rl-compare`: {"objective": SUPERVISED | RL, "score": "nll" | "reward", "ids": [...], "weights": [...],
# "by_step": [[step, [per-example score, ...]], ...], "examples": [...]}. Supervised: example i's id
# (`trainer.data.example_id`), its completion tokens as weight and its summed NLL (nats); RL: prompt
# i's id, weight 1 and its greedy reward (step 0 is the base model), with some completions as examples.
EVAL_SCORES_FILE = "eval_scores.json"
SUPERVISED, RL = "supervised", "rl"
SCORE_OF = {SUPERVISED: "nll", RL: "reward"}


def scores_record(objective: str, ids: list[str], weights: list[float], by_step: list, examples: list = ()) -> dict:
    """The JSON object of EVAL_SCORES_FILE (`by_step`: [[step, [score per example, ...]], ...])."""
    return {"objective": objective, "score": SCORE_OF[objective], "ids": list(ids), "weights": list(weights),
            "by_step": by_step, "examples": list(examples)}


class RunResult:
    """A run's result dataclass as JSON: `to_dict()`, and `from_dict` of that or of summary.json
    (whose extra keys, such as `config`, are ignored)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class TrainResult(RunResult):
    """What a finished run produced. Losses are in nats per completion token.

    Attributes:
        method: "lora" or "full".
        output_dir: the run directory.
        model_dir: the peft adapter dir (LoRA) or the saved model dir (full).
        curves_path, summary_path: curves.json and summary.json in the run directory.
        final_train_loss: train loss of the last step's batch (before its update).
        final_eval_loss: held-out loss after the last step.
        steps: optimizer steps taken.
        tokens: non-padding input tokens trained on, summed over processes and the whole run.
        wall_s: wall time of the train() call that finished the run (seconds).
        tokens_per_s: tokens trained on in that call / its time spent in training steps.
        peak_memory_bytes: see `peak_memory_kind`.
        trainable_params: parameters updated by the optimizer (adapter only for LoRA).
        config_hash: `TrainConfig.hash(data fingerprint)`: same hash, same training.
        peak_memory_kind: "cuda_max_memory_allocated" (GPU) or "process_max_rss" (CPU, whole process).
        scores_path: eval_scores.json, each held-out example's NLL at each evaluated step.
    """

    method: str
    output_dir: str
    model_dir: str
    curves_path: str
    summary_path: str
    final_train_loss: float
    final_eval_loss: float
    steps: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    trainable_params: int
    config_hash: str
    peak_memory_kind: str = ""
    scores_path: str = ""
