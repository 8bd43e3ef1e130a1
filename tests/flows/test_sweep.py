"""The sweep flow: a LoRA LR grid fanned out through a Prefect task runner into fit_lr_sweep."""

from __future__ import annotations

import importlib.util
import os

import pytest

from data.errors import UserError
from flows.config import SweepConfig, load_sweep_config
from tests.flows.test_pipeline import tiny_overrides


def test_grid_covers_method_rank_lr():
    config = SweepConfig(methods=["lora", "full"], ranks=[4, 8], lora_lrs=[1e-4, 1e-3], full_lrs=[1e-5])
    assert config.grid() == [("lora", 4, 1e-4), ("lora", 4, 1e-3), ("lora", 8, 1e-4), ("lora", 8, 1e-3),
                             ("full", None, 1e-5)]
    with pytest.raises(UserError, match="methods"):
        SweepConfig(methods=["qlora"])
    with pytest.raises(UserError, match="lora_lrs"):
        SweepConfig(lora_lrs=[0.0])


def test_seed_replicates_share_one_held_out_split_and_the_first_is_the_unreplicated_cell(tmp_path):
    from flows.config import PipelineConfig
    from flows.sweep import grid_cells

    def cells(**base):
        config = SweepConfig(base=PipelineConfig(**base), methods=["lora", "full"], ranks=[4], lora_lrs=[1e-3],
                             full_lrs=[1e-4])
        return grid_cells(config, tmp_path, "fingerprint", "code")

    single, replicated = cells(), cells(seeds=[0, 1, 2])
    assert [c.label for c in replicated] == [f"{m}-seed{s}" for m in ("lora-r4-lr0.001", "full-lr0.0001") for s in (0, 1, 2)]
    assert [c.seed for c in replicated] == [0, 1, 2, 0, 1, 2]
    assert {c.train_config.split_seed for c in replicated} == {0}  # one held-out split: the seeds pair
    assert [c.train_config.seed for c in replicated] == [0, 1, 2, 0, 1, 2]
    assert len({c.key for c in replicated}) == 6
    assert {c.key for c in single} == {c.key for c in replicated if c.seed == 0}  # shared with the plain sweep


@pytest.mark.skipif(importlib.util.find_spec("prefect_dask") is not None, reason="prefect-dask is installed")
def test_dask_runner_without_prefect_dask_is_a_user_error():
    from flows.sweep import make_task_runner

    with pytest.raises(UserError, match="pip install prefect-dask"):
        make_task_runner("dask")


def test_process_workers_share_the_cores_unless_the_user_set_threads(monkeypatch):
    from flows.sweep import make_task_runner

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    make_task_runner("process", 4)
    assert os.environ["OMP_NUM_THREADS"] == "2"  # 8 cores, 4 workers
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    make_task_runner("process", 16)
    assert os.environ["OMP_NUM_THREADS"] == "3"  # the user's setting wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    make_task_runner("thread", 4)  # one process: nothing to share
    assert "OMP_NUM_THREADS" not in os.environ


@pytest.mark.slow
def test_sweep_fans_out_and_fits_the_lr_optimum(prefect_harness, flow_settings, tiny_models, registry_client,
                                                monkeypatch):
    from flows.sweep import make_task_runner, sweep

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what make_task_runner would set, restored after the test

    base = [f"base.{o}" for o in tiny_overrides(tiny_models("llama"), name="tiny-sweep")]
    config = load_sweep_config(None, base + ["methods=[lora]", "ranks=[4]", "lora_lrs=[1e-4, 1e-3, 1e-2]"])
    summary = sweep.with_options(task_runner=make_task_runner("process", 3))(
        config, workdir=str(flow_settings.home.parent))

    assert [(c["method"], c["rank"], c["lr"]) for c in summary["grid"]] == config.grid()
    assert [r["steps"] for r in summary["results"]] == [6, 6, 6]
    (group,) = summary["fit"]["groups"]
    assert (group["method"], group["rank"], tuple(group["lrs"])) == ("lora", 4, (1e-4, 1e-3, 1e-2))
    best = min(summary["results"], key=lambda r: r["final_eval_loss"])
    assert group["best_observed_loss"] == pytest.approx(best["final_eval_loss"])
    experiment = registry_client.get_experiment_by_name("lowregret/tiny-sweep")
    runs = registry_client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [
        "lora-r4-lr0.0001", "lora-r4-lr0.001", "lora-r4-lr0.01", "sweep"]
