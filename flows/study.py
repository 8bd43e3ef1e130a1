"""The study flow: the experiments of study/design.py through the sweep flow's own cached task,
tracked in MLflow, analysed by study/analysis.py (docs/STUDY.md).

Why not one `sweep` sub-flow per part: the study has ~20 parts in three stages, and every sweep
flow starts its own process pool whose workers import torch, transformers and Prefect again
(~10-15 s of CPU each on these machines). This flow submits every cell of a stage to one pool
instead, through the same task (`flows.sweep.train_cell`, same cache key, same run folders), so
a cell trained here is a cached cell of `lowregret sweep --config <part>.yaml` and the other way
round. Re-running the study skips every finished cell (Prefect's persisted cache).
"""

# No `from __future__ import annotations`: Prefect builds the flow's parameter model from these.
import json
import os
import time
from pathlib import Path

from prefect import flow, task

from flows import tasks
from flows.config import sweep_config_from_dict
from flows.settings import configure_mlflow, load_settings
from flows.sweep import grid_cells, train_cell


@task
def prepare_facts_model(out_dir: str, scale_name: str) -> str:
    """The random-init capacity model and its tokenizer (study/facts_model.py), made once."""
    from study.design import SCALES
    from study.facts_model import write_base_model

    return write_base_model(out_dir, SCALES[scale_name].model_spec)


def run_parts(parts: list, settings, code: str) -> list:
    """Train every cell of `parts` (each a study.design.Part) on the flow's task runner; wait.

    A cell that two parts share (same run key) is trained once. Returns study.analysis.Cell records.
    """
    from study.analysis import Cell

    inputs, futures, records = {}, {}, []
    configs = [sweep_config_from_dict(part.sweep) for part in parts]  # every UserError before any training
    for part, config in zip(parts, configs, strict=True):
        key = (config.base.model, config.base.dataset, config.base.train.get("dataset_limit"))
        if key not in inputs:
            inputs[key] = tasks.check_inputs(config.base)
        fingerprint = inputs[key]["fingerprint"]
        for cell in grid_cells(config, settings.runs_dir / config.base.name / "sweep", fingerprint, code):
            if cell.key not in futures:
                futures[cell.key] = train_cell.submit(cell.train_config, fingerprint, code)
            records.append((part, cell))
    results = {key: future.result() for key, future in futures.items()}
    return [Cell(part.experiment, part.name, part.tags | {"seed": cell.seed}, cell.method, cell.rank, cell.lr, cell.label, cell.key,
                 results[cell.key].output_dir) for part, cell in records]


@task
def choose_lrs(cells: list, scale_name: str):
    from study.analysis import choose_lrs as choose
    from study.design import SCALES

    return choose(cells, SCALES[scale_name])


@task
def edge_extensions(cells: list, parts: list, scale_name: str) -> list:
    from study.analysis import edge_extensions as extensions
    from study.design import SCALES

    return extensions(cells, parts, SCALES[scale_name].lr_max_extensions)


@task
def analyse(cells: list, scale_name: str, base_model: str, out_dir: str, provenance: dict) -> dict:
    """results.json, cells.json and the charts in out_dir."""
    from study.analysis import analyse as analyse_cells
    from study.charts import draw_all
    from study.design import SCALES

    results = analyse_cells(cells, SCALES[scale_name], base_model) | {"provenance": provenance}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cells.json").write_text(json.dumps([c.to_dict() for c in cells], indent=1) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    results["charts"] = draw_all(results, out)
    return results


def reanalyse(scale_name: str = "full", workdir: str | None = None, calibrate_path: str | None = None,
              docs_dir: str | None = None, command: str = "lowregret study --reanalyse") -> dict:
    """The tables, charts and (optionally) the calibration again from the cells of the last study in
    `workdir` (its reports/study-<scale>/cells.json), training nothing: after a change to the
    analysis, without paying for the runs again. Provenance: this analysis (date, commit, command)
    plus `trained_by`, the date, commit and command of the study run that trained the cells (kept
    through later re-analyses).

    Raises:
        UserError: no finished study in `workdir`, or some of its run folders are gone (nothing written).
    """
    from data.errors import UserError
    from study import calibrate
    from study.analysis import Cell, cells_manifest

    started = time.time()
    settings = load_settings(workdir)
    out_dir = settings.reports_dir / f"study-{scale_name}"
    manifest = cells_manifest(settings.reports_dir, scale_name)
    cells = [Cell(**c) for c in json.loads(manifest.read_text())]
    gone = [c.run_dir for c in cells if not (Path(c.run_dir) / "summary.json").is_file()]
    if gone:
        raise UserError(f"{len(gone)} of the {len(cells)} runs listed in {manifest} are gone (first: {gone[0]}): "
                        "run `lowregret study` again to train them.")
    (memorised,) = [c for c in cells if c.experiment == "memorise"]
    earlier = out_dir / "results.json"
    before = json.loads(earlier.read_text()).get("provenance") or {} if earlier.is_file() else {}
    # The study that trained the cells: kept through any number of re-analyses.
    trained_by = before.get("trained_by") or {k: before[k] for k in ("date", "commit", "command") if k in before}
    provenance = calibrate.provenance(command, started, scale_name, [c.run_key for c in cells])
    if trained_by:
        provenance["trained_by"] = trained_by
    results = analyse(cells, scale_name, str(Path(memorised.run_dir) / "model"), str(out_dir), provenance)
    if docs_dir:
        results["published"] = publish.fn(str(out_dir), docs_dir)
    if calibrate_path:
        results["calibration"] = write_calibration.fn(results, calibrate_path)
    results["wall_s"] = round(time.time() - started, 1)
    results["load_average_end"] = os.getloadavg()
    return results


@task
def publish(out_dir: str, docs_dir: str) -> list[str]:
    """Copy results.json and the charts from out_dir to docs_dir (docs/study/ in this project)."""
    import shutil

    target = Path(docs_dir)
    target.mkdir(parents=True, exist_ok=True)
    sources = [Path(out_dir) / "results.json", *sorted(Path(out_dir).glob("*.png"))]
    return [str(shutil.copy2(p, target / p.name)) for p in sources]


@task
def write_calibration(results: dict, path: str) -> str:
    from study.calibrate import calibration_record, write_calibration_file

    return write_calibration_file(calibration_record(results), path)


@task(**tasks.IO_RETRIES)
def log_cells(settings, experiment: str, parent_run_id: str, cells: list) -> int:
    """One nested MLflow run per cell not yet logged in `experiment` (tag run_key); returns how many."""
    from mlflow.tracking import MlflowClient

    from evaluation.runs import load_run
    from flows.settings import ensure_experiment
    from trainer.result import TrainResult

    client = MlflowClient(settings.tracking_uri)
    experiment_id = ensure_experiment(experiment, settings)
    logged = {r.data.tags.get("run_key") for r in client.search_runs([experiment_id], max_results=50000)}
    new = {c.run_key: c for c in cells if c.run_key not in logged}
    for cell in new.values():
        run_id = tasks.start_tracking.fn(settings, experiment, f"{cell.part.removeprefix('study-')}/{cell.label}",
                                         {"method": cell.method, "rank": cell.rank, "lr": cell.lr,
                                          "experiment": cell.experiment, **cell.tags},
                                         parent_run_id, tags={"run_key": cell.run_key, "part": cell.part})
        tasks.log_training.fn(settings, run_id, TrainResult.from_dict(load_run(cell.run_dir).summary))
        tasks.end_tracking.fn(settings, run_id)
    return len(new)


@flow(name="lowregret-study")
def study(scale_name: str = "full", workdir: str | None = None, calibrate_path: str | None = None,
          docs_dir: str | None = None, command: str = "lowregret study") -> dict:
    """Run (or resume) the study at a scale; write results, charts and optionally the calibration."""
    from study import calibrate
    from study import design as d

    started = time.time()
    settings = load_settings(workdir)
    configure_mlflow(settings)
    scale = d.SCALES[scale_name]
    code = tasks.code_version()
    root = settings.runs_dir / f"study-{scale.name}"
    random_base = prepare_facts_model(str(root / "facts-model-init"), scale.name)
    # Stage 1: teach the capacity model the facts format, then to store facts.
    (pretrained,) = run_parts([d.pretrain_part(scale, random_base)], settings, code)
    (memorised,) = run_parts([d.memorise_part(scale, str(Path(pretrained.run_dir) / "model"))], settings, code)
    base = str(Path(memorised.run_dir) / "model")
    # Stage 2: the LR sweeps (facts model; the real model on real corpora).
    lr_parts = d.lr_parts(scale, base)
    stage2 = run_parts([d.facts_lr_part(scale, base), *lr_parts], settings, code)
    # Stage 3: everything at the LRs stage 2 found, and one more LR where a sweep hit its edge.
    lrs = choose_lrs(stage2, scale.name)
    stage3 = run_parts(d.stage3_parts(scale, base, lrs, edge_extensions(stage2, lr_parts, scale.name)), settings, code)
    cells = [pretrained, memorised, *stage2, *stage3]

    provenance = calibrate.provenance(command, started, scale.name, [c.run_key for c in cells])
    out_dir = settings.reports_dir / f"study-{scale.name}"
    results = analyse(cells, scale.name, base, str(out_dir), provenance)
    if docs_dir:
        results["published"] = publish(str(out_dir), docs_dir)
    if calibrate_path:
        results["calibration"] = write_calibration(results, calibrate_path)
    experiment = f"lowregret/study-{scale.name}"
    parent = tasks.start_tracking(settings, experiment, "study", {"scale": scale.name, "cells": len(cells)},
                                  tags={"code_version": code, "command": command})
    results["logged_cells"] = log_cells(settings, experiment, parent, cells)
    tasks.log_files(settings, parent, [str(out_dir / "results.json"), *results["charts"]])
    tasks.end_tracking(settings, parent)
    results["wall_s"] = round(time.time() - started, 1)
    results["load_average_end"] = os.getloadavg()
    return results
