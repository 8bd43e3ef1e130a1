"""`TrainResult`: the small record a training run hands to the next step (torch-free); `RunResult`,
its summary.json round trip, shared with `trainer.rl_config.RLResult`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Written by the trainer next to curves.json: each held-out example's id (`trainer.data.example_id`),
# completion-token count and summed NLL (nats) at every eval step, {"example_ids": [...],
# "tokens": [...], "nll": [[step, [per-example NLL, ...]], ...]}. The paired regret statistics of
# `evaluation.compare` read it.
EVAL_EXAMPLES_FILE = "eval_examples.json"


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
