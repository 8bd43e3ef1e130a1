"""Safe under concurrency: locks that hold across processes and die with their holder, a fresh
store created once by processes starting together, the registry lock on a tracking server, and four
pipelines started at once on one registered name."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env | {"PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_lock_is_exclusive_across_processes_and_freed_when_its_holder_is_killed(tmp_path):
    from prefect.locking.protocol import LockManager

    from flows.locks import ProcessLockManager

    manager = ProcessLockManager(tmp_path)
    assert isinstance(manager, LockManager)
    holder = _python(f"import time; from flows.locks import ProcessLockManager\n"
                     f"assert ProcessLockManager({str(tmp_path)!r}).acquire_lock('baseline', 'other')\n"
                     "print('held', flush=True); time.sleep(600)")
    try:
        assert holder.stdout.readline().strip() == "held"
        assert manager.is_locked("baseline")
        assert not manager.acquire_lock("baseline", "me", acquire_timeout=0.3)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs; the kernel drops the flock
        holder.wait()
    assert manager.acquire_lock("baseline", "me", acquire_timeout=10)
    assert manager.is_lock_holder("baseline", "me") and not manager.is_lock_holder("baseline", "other")
    assert not manager.acquire_lock("baseline", "a-thread-of-mine", acquire_timeout=0.2)  # same process waits too
    manager.release_lock("baseline", "me")
    assert not manager.is_locked("baseline")


def test_processes_starting_together_create_a_fresh_store_once(tmp_path):
    """MLflow migrates a fresh SQLite database on first use; four processes do it at the same moment."""
    go = tmp_path / "go"
    code = (
        "import os, pathlib, time\n"
        "import mlflow.store.tracking.sqlalchemy_store, mlflow.store.model_registry.sqlalchemy_store\n"
        "from flows.registry import client_for\n"
        "from flows.settings import configure_mlflow, load_settings\n"
        f"settings = load_settings({str(tmp_path)!r}, environ={{}})\n"
        "print('ready', flush=True)\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.005)\n"
        "configure_mlflow(settings)\n"
        "client = client_for(settings)\n"
        "client.create_experiment(f'experiment-{os.getpid()}')\n"
        "print(len(client.search_registered_models()), flush=True)\n"
    )
    procs = [_python(code) for _ in range(4)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4
    go.touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outputs)[-4000:]
    assert not any("duplicate column" in out or "already exists" in out for out in outputs)


def test_the_registry_lock_on_a_tracking_server_is_one_prefect_slot(prefect_harness, flow_settings):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.locks import registry_lock

    remote = dataclasses.replace(flow_settings, tracking_uri="http://mlflow.invalid:5000",
                                 registry_uri="http://mlflow.invalid:5000", prefect_api_url=PREFECT_API_URL.value())
    inside, most_inside, lock = [], [], threading.Lock()

    def write(i: int) -> None:
        with registry_lock(remote, "shared-model", timeout_s=120):
            with lock:
                inside.append(i)
                most_inside.append(len(inside))
            time.sleep(0.3)
            with lock:
                inside.remove(i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(most_inside) == 3 and max(most_inside) == 1
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("lowregret-registry-shared-model").limit == 1


@pytest.mark.slow
def test_four_pipelines_at_once_on_one_name(prefect_harness, tiny_models, tmp_path):
    """Two identical pipelines and two with other LoRA LRs, all on a fresh store at the same moment:
    no crash, one baseline trained (the others wait for it and reuse it), one version per distinct
    run, consistent tags, exactly one champion and it is the best of them."""
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from tests.flows.test_pipeline import tiny_overrides

    name = "tiny-concurrent"
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env |= {"PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    lora_lrs = ["1e-3", "1e-3", "3e-3", "3e-4"]
    logs = [tmp_path / f"pipeline-{i}.log" for i in range(len(lora_lrs))]
    procs = []
    for lr, log in zip(lora_lrs, logs, strict=True):
        with log.open("w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "pipeline", "--workdir", str(work),
                 *tiny_overrides(tiny_models("llama"), name=name, lora_lr=lr)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]

    db = f"sqlite:///{work / '.lowregret' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=db, registry_uri=db)
    experiment = client.get_experiment_by_name(f"lowregret/{name}").experiment_id
    runs = client.search_runs([experiment], max_results=100)
    assert {r.info.status for r in runs} == {"FINISHED"}
    baselines = [r for r in runs if r.info.run_name.startswith(f"{name} full ")]
    assert sorted(r.data.tags["cached"] for r in baselines) == ["False", "True", "True", "True"]
    assert len({r.data.tags["output_dir"] for r in baselines}) == 1

    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 3  # the two identical pipelines share one version
    assert len({v.tags["run_fingerprint"] for v in versions}) == 3
    for version in versions:
        run = client.get_run(version.run_id)
        assert version.tags["mlflow_run_id"] == version.run_id and run.info.run_name.startswith(f"{name} lora ")
        assert float(version.tags["eval_loss"]) == pytest.approx(run.data.metrics["final_eval_loss"])
    aliases = client.get_registered_model(name).aliases
    best = min(versions, key=lambda v: (float(v.tags["eval_loss"]), -int(v.version)))
    assert str(aliases["champion"]) == str(best.version)
    history = json.loads(client.get_registered_model(name).tags.get("champion_history", "[]"))
    assert str(best.version) not in history and len(set(history)) == len(history)
    assert set(history) <= {str(v.version) for v in versions}  # history keeps versions as strings
