"""MLflow tracking of training runs: the pieces the pipeline's tasks and a standalone
`lowregret train ... report_to=mlflow` share.

A standalone run logs through `MlflowCallback`, a `trainer.callbacks.TrainCallback` the `train`
command hands to `trainer.train`: params when the run starts, train loss / LR / tokens per second
at every step and the held-out loss at each evaluation (MLflow `step=` the optimizer step), then the
final metrics and files. The trainer itself never imports MLflow (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

STANDALONE_EXPERIMENT = "lowregret/train"
_BATCH = 900  # MLflow caps one log_batch at 1000 metrics
# curves.json names of the supervised loop's curves -> their MLflow metric names (RL curves keep theirs).
_CURVE_METRICS = {"train": "train_loss", "eval": "eval_loss"}
# The final numbers logged of a TrainResult, and of an RLResult.
_FINAL_METRICS = ("final_train_loss", "final_eval_loss", "steps", "tokens", "wall_s", "tokens_per_s",
                  "trainable_params", "peak_memory_bytes")
_RL_FINAL_METRICS = ("base_eval_reward", "base_eval_accuracy", "final_eval_reward", "final_eval_accuracy",
                     "final_train_reward", "steps", "episodes", "completion_tokens", "wall_s", "sample_tokens_per_s",
                     "train_tokens_per_s", "trainable_params", "peak_memory_bytes")


def log_params(client, run_id: str, params: dict) -> None:
    """Log a nested dict as `a.b` params (values cut to MLflow's 6000 characters)."""
    for key, value in flatten(params).items():
        client.log_param(run_id, key, str(value)[:6000])


def flatten(params: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def log_metrics(client, run_id: str, metrics: list) -> None:
    """Log `mlflow.entities.Metric`s in batches MLflow accepts."""
    for start in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + _BATCH])


def log_result(client, run_id: str, result, *, curves: bool, tags: dict | None = None,
               files: tuple[str, ...] = ()) -> None:
    """Log a finished `TrainResult` or `trainer.rl_config.RLResult`: its curves (when not logged
    live), final metrics, tags and files (its per-example held-out scores too).

    Args:
        curves: also log curves.json with step=: a TrainResult's as `train_loss` / `eval_loss`, an
            RLResult's under their own names (the pipeline logs a run after it finished; a standalone
            run has logged them step by step already).
        files: extra files or directories to log beside curves.json and summary.json.
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    if curves:
        recorded = json.loads(Path(result.curves_path).read_text())
        metrics += [Metric(_CURVE_METRICS.get(name, name), float(value), now, int(step))
                    for name, points in recorded.items() for step, value in points]
    rl = hasattr(result, "final_eval_reward")
    finals = {name: getattr(result, name) for name in (_RL_FINAL_METRICS if rl else _FINAL_METRICS)}
    metrics += [Metric(k, float(v), now, 0) for k, v in finals.items() if v is not None]
    log_metrics(client, run_id, metrics)
    for key, value in {"output_dir": result.output_dir, "config_hash": result.config_hash, **(tags or {})}.items():
        client.set_tag(run_id, key, str(value))
    for path in (result.curves_path, result.summary_path, *((result.scores_path,) if result.scores_path else ()), *files):
        if Path(path).is_dir():
            client.log_artifacts(run_id, path, Path(path).name)
        else:
            client.log_artifact(run_id, path)


class MlflowCallback:
    """Logs one standalone training run to MLflow as it happens (a `TrainCallback`).

    The run is created in `on_start`, after the trainer has checked the data and the model, so a
    bad input leaves no MLflow run behind. `fail()` marks a started run FAILED.
    """

    def __init__(self, settings, experiment: str = STANDALONE_EXPERIMENT):
        self.settings = settings
        self.experiment = experiment
        self.run_id: str | None = None
        self._client = None

    def check(self) -> None:
        """Fail before training if a tracking server cannot be reached (a local SQLite store always can).

        Raises:
            UserError: the tracking URI's server did not answer.
        """
        if self.settings.tracking_uri.startswith(("sqlite:", "file:", "/")):
            return
        from mlflow.tracking import MlflowClient

        from data.errors import UserError

        try:
            MlflowClient(self.settings.tracking_uri).search_experiments(max_results=1)
        except Exception as exc:  # MlflowException, requests' ConnectionError, ...: all mean "not reachable"
            raise UserError(
                f"report_to=mlflow, but the MLflow tracking server {self.settings.tracking_uri} did not answer "
                f"({type(exc).__name__}). Start it, fix MLFLOW_TRACKING_URI, or set report_to=none."
            ) from exc

    def on_start(self, config, info: dict) -> None:
        from flows.registry import client_for
        from flows.settings import ensure_experiment, prepare_folders

        prepare_folders(self.settings)
        self._client = client_for(self.settings)
        run = self._client.create_run(ensure_experiment(self.experiment, self.settings),
                                      run_name=Path(info["output_dir"]).name,
                                      tags={"method": config.method, "config_hash": info["config_hash"]})
        self.run_id = run.info.run_id
        log_params(self._client, self.run_id, {**config.to_dict(), "run": {
            k: info[k] for k in ("steps", "global_batch", "processes", "trainable_params")}, "data": info["data"]})

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        log_metrics(self._client, self.run_id, [Metric(k, float(v), now, step) for k, v in metrics.items()])

    def on_end(self, result) -> None:
        run_dir = Path(result.output_dir)
        files = [str(run_dir / "config.json")]
        if result.method == "lora":
            files.append(result.model_dir)  # the peft adapter: megabytes; a full model stays on disk
        log_result(self._client, self.run_id, result, curves=False, files=tuple(files))
        self._client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        if self.run_id is not None:
            self._client.set_terminated(self.run_id, "FAILED")
