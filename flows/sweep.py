"""The sweep flow: a grid over method × rank × LR, fanned out through a Prefect task runner, fed
to `evaluation.sweep.fit_lr_sweep` (optimal LR per method and rank, LoRA/FullFT LR ratio).

Runners: `process` (Prefect's ProcessPoolTaskRunner, the default: one process per run), `thread`
(ThreadPoolTaskRunner: only with one worker, because transformers 5.23 builds models on the meta
device through process-wide state and concurrent `from_pretrained` calls in threads fail with
"Cannot copy out of meta tensor"), `dask` and `ray` (prefect-dask / prefect-ray, imported only
when chosen). Each grid cell is cached like the pipeline's baseline (a SERIALIZABLE transaction, so
two sweeps sharing a cell train it once), so widening a sweep reruns only the new cells.
"""

# No `from __future__ import annotations`: Prefect builds the flows' parameter models from these
# annotations when a deployment loads this file by path, where string annotations do not resolve.
import dataclasses
import json
import os

from prefect import flow, task

from data.errors import UserError
from flows import tasks
from flows.config import SweepConfig
from flows.settings import configure_mlflow, load_settings
from flows.tracking import STATE_HOOKS

RUNNERS = ("thread", "process", "dask", "ray")


def share_cores(workers: int) -> None:
    """Give each of `workers` worker processes cores // workers CPU threads (OMP_NUM_THREADS, which
    torch reads when a spawned worker imports it), unless the user set OMP_NUM_THREADS. Left alone,
    every worker takes all the cores: on 2 cores two 2-thread runs of the study's facts model trained
    at 14k tokens/s, two 1-thread runs at 55k each (2026-12-06, docs/FLOWS.md "Sweeps")."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def make_task_runner(kind: str = "process", workers: int | None = None):
    """A Prefect task runner by name.

    Raises:
        UserError: an unknown name, or dask/ray without its Prefect integration installed.
    """
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if kind in ("process", "dask") and workers and workers > 1:
        share_cores(workers)
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "process":
        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise UserError("--runner dask needs prefect-dask: `pip install prefect-dask`.") from exc
        # A local cluster: its dashboard would otherwise listen on every interface (0.0.0.0:8787).
        cluster_kwargs = {"dashboard_address": None} | ({"n_workers": workers} if workers else {})
        return DaskTaskRunner(cluster_kwargs=cluster_kwargs)
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise UserError("--runner ray needs prefect-ray: `pip install prefect-ray`.") from exc
        return RayTaskRunner()
    raise UserError(f"--runner {kind!r}: choose one of {', '.join(RUNNERS)}.")


def _cell_cache_key(context, parameters) -> str:
    return "sweep-" + tasks.run_key(parameters["train_config"], parameters["data_fingerprint"], parameters["code"])


@dataclasses.dataclass(frozen=True)
class GridCell:
    """One (method, rank, LR, seed) run of a sweep: its label, run key and TrainConfig (output under runs_dir)."""

    method: str
    rank: int | None
    lr: float
    label: str
    key: str
    train_config: object
    seed: int = 0


def grid_cells(config: SweepConfig, runs_dir, data_fingerprint: str, code: str) -> list[GridCell]:
    """Every cell of `config`'s grid, each trained into `runs_dir/<label>-<run key>`.

    With `base.seeds` every (method, rank, LR) is trained once per seed, all on the first seed's
    held-out split (as the pipeline's replicates), labelled `-seed<s>`; the first seed's run is the
    same run (same key) as the cell of a sweep without seeds.
    """
    base, cells = config.base, []
    replicated = base.seeds is not None
    for method, rank, lr in config.grid():
        for seed in base.run_seeds:
            train_config = base.train_config(method, rank=rank or base.rank, lr=lr, seed=seed)
            key = tasks.run_key(train_config, data_fingerprint, code)
            label = (f"{method}-r{rank}-lr{lr:g}" if rank else f"{method}-lr{lr:g}") + (f"-seed{seed}" if replicated else "")
            train_config = base.train_config(method, rank=rank or base.rank, lr=lr, seed=seed,
                                             output_dir=str(runs_dir / f"{label}-{key}"), overwrite=True)
            cells.append(GridCell(method, rank, lr, label, key, train_config, seed))
    return cells


@task(cache_policy=tasks.serializable_cache(_cell_cache_key), persist_result=True, cache_expiration=None,
      result_serializer="json")
def train_cell(train_config, data_fingerprint: str, code: str):
    """One grid cell (cached by what it trains)."""
    from trainer.launch import run

    return run(train_config, log=tasks.task_log(), progress=False)


@flow(name="lowregret-sweep", **STATE_HOOKS)
def sweep(config: SweepConfig, workdir: str | None = None) -> dict:
    """Train every (method, rank, LR) cell concurrently; fit the LR optimum per group."""
    settings = load_settings(workdir)
    configure_mlflow(settings)
    base = config.base
    data = tasks.check_inputs(base)
    code = tasks.code_version()
    runs, reports = settings.runs_dir / base.name / "sweep", settings.reports_dir / base.name / "sweep"
    cells, futures = [], []
    for cell in grid_cells(config, runs, data["fingerprint"], code):
        cells.append((cell.method, cell.rank, cell.lr, cell.label))
        futures.append(train_cell.submit(cell.train_config, data["fingerprint"], code))
    results = [future.result() for future in futures]

    fit = tasks.fit_sweep([((rank, lr), result) for (_, rank, lr, _), result in zip(cells, results, strict=True)])
    chart = tasks.plot_runs({label: (r.curves_path, method) for (method, *_, label), r in zip(cells, results, strict=True)},
                            str(reports / "curves.png"),
                            f"{base.model} on {base.dataset}: sweep of {len(cells)} runs (method x rank x LR)\n"
                            "held-out (bold) and training (faint) loss")
    parent = tasks.start_tracking(settings, base.experiment, "sweep", {"grid": json.dumps(config.grid())},
                                  tags={"code_version": code})
    for (method, rank, lr, label), result in zip(cells, results, strict=True):
        child = tasks.start_tracking(settings, base.experiment, label,
                                     {"method": method, "rank": rank, "lr": lr}, parent)
        tasks.log_training(settings, child, result)
        tasks.end_tracking(settings, child)
    summary = {"grid": [dict(zip(("method", "rank", "lr", "label"), c, strict=True)) for c in cells],
               "results": [r.to_dict() for r in results], "fit": dataclasses.asdict(fit), "chart": chart}
    summary_path = tasks.write_json(str(reports / "sweep.json"), summary)
    tasks.log_files(settings, parent, [summary_path, chart])
    tasks.end_tracking(settings, parent)
    return summary
