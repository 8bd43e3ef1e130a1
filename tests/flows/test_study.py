"""`lowregret study --quick` end to end: every experiment's runs through the sweep task, the tables,
the charts and a calibration record; a second run trains nothing (resumable)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from flows.config import sweep_config_from_dict
from planner.calibration import load_calibration
from study import design

pytestmark = pytest.mark.slow


def test_every_part_of_both_scales_is_a_valid_sweep_config():
    lrs = design.ChosenLrs(facts_lora=1e-2, facts_full=3e-3, lr_lora=1e-3, lr_full=1e-4)
    for scale in (design.FULL, design.QUICK):
        base = "/tmp/model"
        parts = [design.pretrain_part(scale, base), design.memorise_part(scale, base), design.facts_lr_part(scale, base), *design.lr_parts(scale, base),
                 *design.stage3_parts(scale, base, lrs, [])]
        assert {p.experiment for p in parts} == set(design.EXPERIMENTS)
        for part in parts:
            config = sweep_config_from_dict(part.sweep)
            assert config.base.name == part.name and config.grid()


def test_quick_study_runs_every_experiment_and_resumes(prefect_harness, flow_settings, tmp_path, monkeypatch):
    from flows.study import study
    from flows.sweep import make_task_runner

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what make_task_runner would set, restored after the test

    workdir = str(flow_settings.home.parent)
    calibration_path = tmp_path / "calibration.json"
    run = study.with_options(task_runner=make_task_runner("process", 2))
    started = time.perf_counter()
    results = run(scale_name="quick", workdir=workdir, calibrate_path=str(calibration_path),
                  docs_dir=str(tmp_path / "docs"), command="pytest")
    first_s = time.perf_counter() - started

    assert {"knee", "lr", "layers", "noise", "batch", "provenance"} <= set(results)
    run_keys = set(results["provenance"]["run_ids"])
    sizes = results["knee"]["sizes"]
    assert [s["n_facts"] for s in sizes] == list(design.QUICK.knee_sizes)
    for size in sizes:
        assert [r["rank"] for r in size["ranks"]] == list(design.QUICK.knee_ranks)
        assert size["information_bits"] == size["n_facts"] * math.log2(design.QUICK.facts_choices)
        assert size["predicted"]["min_rank_pow2"] is not None
        for row in size["ranks"]:  # the planner's adapter count is the trainer's; the gate's interval is coherent
            assert row["adapter_params"] == size["predicted"]["adapter_params_per_rank"] * row["rank"]
            assert row["regret_low"] <= row["regret_nats"] <= row["regret_high"]
            assert row["verdict"] in {"PASS", "FAIL", "INCONCLUSIVE"} and row["examples"] == size["n_facts"]
            assert 0 <= row["bits"]["stored_bits"] <= size["information_bits"] and row["run"] in run_keys
    lr = results["lr"]["corpora"]["numpydoc"]
    assert set(results["lr"]["corpora"]) == {"numpydoc"}
    assert {(g["method"], g["rank"]) for g in lr["fit"]["groups"]} == (
        {("full", None)} | {("lora", r) for r in design.QUICK.lr_ranks})
    assert [v["rank"] for v in lr["verdicts"]] == list(design.QUICK.lr_ranks)
    assert set(lr["early_curves"]["ranks"]) == set(design.QUICK.lr_ranks)
    noise = results["noise"]
    assert [r["seed"] for r in noise["seeds"]] == list(design.QUICK.noise_seeds)
    assert len(noise["replicates"]["seed_regrets"]) == len(design.QUICK.noise_seeds)  # seeds paired, one split
    assert noise["regret_sd"] > 0 and noise["replicates"]["full_seed_sd"] is not None
    assert {r["targets"] for r in results["layers"]["facts"]} == {t for t, _ in design.QUICK.facts_layer_cells}
    assert [r["batch"] for r in results["batch"]["batches"]] == list(design.QUICK.batch_sizes)
    assert len(results["charts"]) >= 5
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 5000 for p in results["charts"])
    published = {Path(p).name for p in results["published"]}
    assert "results.json" in published and {Path(p).name for p in results["charts"]} <= published
    record = load_calibration(calibration_path)  # schema and provenance checked by the planner's loader
    provenance = record["provenance"]
    assert provenance["command"] == "pytest" and len(provenance["commit"]) == 40 and "CPU" in provenance["device"]
    assert provenance["date"].startswith(time.strftime("%Y-%m-%d", time.gmtime()))
    assert set(record["constants"]) == {"bits_per_param", "short_run_lora_over_fullft_lr"}
    for entry in record["constants"].values():  # a value, or why the runs could not determine it
        assert entry["runs"] and set(entry["runs"]) <= set(provenance["run_ids"]) <= run_keys
        assert (entry["value"] is None) == ("why_not" in entry)
    cells = json.loads((flow_settings.reports_dir / "study-quick" / "cells.json").read_text())
    assert results["logged_cells"] == len({c["run_key"] for c in cells})  # one MLflow run per distinct run

    run_dirs = sorted(str(p.parent) for p in flow_settings.runs_dir.rglob("summary.json"))
    started = time.perf_counter()
    again = run(scale_name="quick", workdir=workdir, command="pytest")
    assert sorted(str(p.parent) for p in flow_settings.runs_dir.rglob("summary.json")) == run_dirs  # nothing retrained
    assert again["knee"] == results["knee"] and again["logged_cells"] == 0
    assert time.perf_counter() - started < first_s

    # --reanalyse: the same tables from the same cells, training nothing; provenance keeps the trainer.
    from flows.study import reanalyse

    redone = reanalyse("quick", workdir, calibrate_path=str(calibration_path), command="pytest --reanalyse")
    assert sorted(str(p.parent) for p in flow_settings.runs_dir.rglob("summary.json")) == run_dirs
    assert redone["knee"] == results["knee"] and redone["lr"] == results["lr"]
    assert redone["provenance"]["command"] == "pytest --reanalyse"
    assert redone["provenance"]["trained_by"]["command"] == "pytest"
    assert load_calibration(calibration_path)["provenance"]["trained_by"]["command"] == "pytest"
