"""What a training run tells the outside world while it runs (torch-free).

`train(config, callbacks=[...])` calls these on the main process only. They are how the
`lowregret train` command logs a standalone run to MLflow (`flows.training_log.MlflowCallback`)
while trainer/ itself never imports MLflow or Prefect.
"""

from __future__ import annotations

from typing import Protocol


class TrainCallback(Protocol):
    """Receives a run's start, its per-step metrics and its result."""

    def on_start(self, config, info: dict) -> None:
        """Before step 1 (or the resumed step), once the data and model are ready.

        Args:
            config: the run's `TrainConfig`.
            info: `output_dir`, `steps` (total optimizer steps), `global_batch`, `processes`,
                `trainable_params`, `config_hash`, `data` (the data stats of summary.json).
        """

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """After optimizer step `step` (`train_loss`, `lr`, `tokens_per_s`) and after each held-out
        evaluation (`eval_loss`; step 0 is the base model). Losses in nats per completion token."""

    def on_end(self, result) -> None:
        """After the run's files are in place under output_dir (`result` is the `TrainResult`)."""
