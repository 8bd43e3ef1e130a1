"""The production stack's servers for real: Postgres-backed MLflow and Prefect servers.

The same services as infra/docker-compose.yml, started as local processes (tests/infra/stack.py)
because this machine has no Docker engine. Clients reach them only through the environment
variables the product honours (MLFLOW_TRACKING_URI, PREFECT_API_URL) or plain HTTP.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _get_json(url: str, headers: dict[str, str] | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
        return json.loads(response.read())


def _post_json(url: str, body: dict) -> dict | list:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _client_env(stack, tmp_path: Path) -> dict[str, str]:
    """A child process's environment: the stack's URLs, and a Prefect home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    return env | stack.env | {"PREFECT_HOME": str(tmp_path / "prefect-home")}


def test_mlflow_server_registers_a_version_and_alias_on_postgres(real_stack, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=real_stack.mlflow_url, registry_uri=real_stack.mlflow_url)
    experiment_id = client.create_experiment("stack-check")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "eval_loss", 1.25)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 1}')
    client.log_artifacts(run.info.run_id, str(adapter), "adapter")
    client.set_terminated(run.info.run_id)

    name = "stack-check-adapter"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)

    # Plain HTTP, as an operator's script or a serving system would read the registry.
    quoted = urllib.parse.quote(name)
    model = _get_json(f"{real_stack.mlflow_url}/api/2.0/mlflow/registered-models/get?name={quoted}")
    assert model["registered_model"]["aliases"] == [{"alias": "champion", "version": version.version}]
    by_alias = _get_json(f"{real_stack.mlflow_url}/api/2.0/mlflow/registered-models/alias?name={quoted}&alias=champion")
    assert by_alias["model_version"]["run_id"] == run.info.run_id

    # Artifacts went through the server's proxy (mlflow-artifacts:) into its destination, so
    # clients need no storage credentials; in compose that destination is the MinIO bucket.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert list(real_stack.artifacts_dir.rglob("adapter/adapter_config.json"))


def test_mlflow_allowed_hosts_accepts_compose_service_name_only(real_stack):
    url = f"{real_stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    # Other containers call the server by its compose service name.
    assert isinstance(_get_json(url, headers={"Host": "mlflow:5000"}), dict)
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        _get_json(url, headers={"Host": "attacker.example.com"})
    assert excinfo.value.code == 403


def test_prefect_server_records_a_flow_run_on_postgres(real_stack, tmp_path):
    script = (
        "from prefect import flow, task\n"
        "@task\n"
        "def double(x): return 2 * x\n"
        "@flow(name='stack-check')\n"
        "def stack_check(): return sum(double.map([1, 2, 3]).result())\n"
        "assert stack_check() == 12\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=_client_env(real_stack, tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = _post_json(f"{real_stack.prefect_api_url}/flow_runs/filter",
                      {"flows": {"name": {"any_": ["stack-check"]}}})
    assert [run["state_type"] for run in runs] == ["COMPLETED"]
    task_runs = _post_json(f"{real_stack.prefect_api_url}/task_runs/filter",
                           {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}})
    assert len(task_runs) == 3


def test_prefect_server_accepts_the_kubernetes_gpu_work_pool(real_stack, tmp_path):
    template = REPO / "infra" / "k8s" / "gpu-job-template.json"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "work-pool", "create", "lowregret-gpu",
         "--type", "kubernetes", "--base-job-template", str(template)],
        env=_client_env(real_stack, tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    pool = _get_json(f"{real_stack.prefect_api_url}/work_pools/lowregret-gpu")
    assert pool["type"] == "kubernetes"
    assert pool["base_job_template"] == json.loads(template.read_text())


PIPELINE_NAME = "tiny-prod"


def _pipeline_args(model_dir: Path) -> list[str]:
    """A pipeline that trains in seconds: 6 steps of 4 x 64 tokens on 64 synthetic facts."""
    options = {"name": PIPELINE_NAME, "model": str(model_dir), "dataset": "builtin:facts?n_facts=64", "rank": 4,
               "lora_lr": 1e-3, "full_lr": 1e-4, "threshold": 1.0, "info_method": "lzma",
               "train.max_steps": 6, "train.batch_size": 4, "train.max_length": 64, "train.eval_points": 3,
               "train.eval_max_examples": 16}
    return [f"{key}={value}" for key, value in options.items()]


def _lowregret(args: list[str], env: dict[str, str], timeout_s: int = 900) -> subprocess.CompletedProcess:
    env = env | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def _champion(stack) -> dict:
    quoted = urllib.parse.quote(PIPELINE_NAME)
    return _get_json(f"{stack.mlflow_url}/api/2.0/mlflow/registered-models/alias?name={quoted}&alias=champion")[
        "model_version"]


def test_pipeline_on_the_real_servers_registers_a_champion(real_stack, tmp_path, tiny_models):
    pytest.importorskip("flows.pipeline", reason="the pipeline flow (flows/pipeline.py) is not on this branch yet")
    work = tmp_path / "work"
    work.mkdir()
    done = _lowregret(["pipeline", "--workdir", str(work), *_pipeline_args(tiny_models("llama"))],
                      _client_env(real_stack, tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    quoted = urllib.parse.quote(PIPELINE_NAME)
    model = _get_json(f"{real_stack.mlflow_url}/api/2.0/mlflow/registered-models/get?name={quoted}")
    aliases = {a["alias"]: a["version"] for a in model["registered_model"]["aliases"]}
    champion = _champion(real_stack)
    assert aliases["champion"] == champion["version"] == "1"

    assert not list(work.rglob("mlflow.db")), "tracking and registry must be the server's, not SQLite"
    runs = _post_json(f"{real_stack.prefect_api_url}/flow_runs/filter",
                      {"flows": {"name": {"any_": ["lowregret-pipeline"]}}})
    assert [r["state_type"] for r in runs] == ["COMPLETED"]


def test_promote_through_the_cli_tags_the_version_on_the_server(real_stack, tmp_path):
    pytest.importorskip("flows.registry", reason="flows/registry.py is not on this branch yet")
    done = _lowregret(["promote", PIPELINE_NAME, "1", "--reason", "canary passed",
                       "--workdir", str(tmp_path)], _client_env(real_stack, tmp_path), timeout_s=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    quoted = urllib.parse.quote(PIPELINE_NAME)
    version = _get_json(f"{real_stack.mlflow_url}/api/2.0/mlflow/model-versions/get?name={quoted}&version=1")
    tags = {tag["key"]: tag["value"] for tag in version["model_version"].get("tags", [])}
    assert tags.get("promoted_reason") == "canary passed"
    assert _champion(real_stack)["version"] == "1"


def test_pipeline_artifacts_go_to_the_mlflow_servers_artifact_store(real_stack):
    pytest.importorskip("flows.pipeline", reason="the pipeline flow (flows/pipeline.py) is not on this branch yet")
    champion = _champion(real_stack)  # registered by the test above
    run = _get_json(f"{real_stack.mlflow_url}/api/2.0/mlflow/runs/get?run_id={champion['run_id']}")["run"]
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:"), run["info"]["artifact_uri"]
    assert list(real_stack.artifacts_dir.rglob("adapter_model.safetensors"))


def test_deployment_on_a_process_work_pool_runs_through_a_worker(real_stack, tmp_path, tiny_models):
    """The nightly path: deploy on a cron to a work pool, a worker picks up a run and finishes it."""
    pytest.importorskip("flows.deploy", reason="flows/deploy.py is not on this branch yet")
    env = _client_env(real_stack, tmp_path)
    prefect = str(Path(sys.executable).parent / "prefect")
    created = subprocess.run([prefect, "work-pool", "create", "lowregret-process", "--type", "process"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    done = _lowregret(["deploy", "--cron", "0 2 * * *", "--work-pool", "lowregret-process", "--name", "nightly",
                       "--workdir", str(tmp_path / "work"), *_pipeline_args(tiny_models("llama"))], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deployment = _get_json(f"{real_stack.prefect_api_url}/deployments/name/lowregret-pipeline/nightly")
    assert deployment["work_pool_name"] == "lowregret-process"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]

    # Not waiting for 02:00: trigger a run now, and let one worker poll once and execute it.
    triggered = subprocess.run([prefect, "deployment", "run", "lowregret-pipeline/nightly"],
                               env=env, capture_output=True, text=True, timeout=120)
    assert triggered.returncode == 0, triggered.stdout + triggered.stderr
    # The run this test created: the scheduler also creates the cron's next runs (SCHEDULED for
    # 02:00), so the deployment's run list depends on timing; this run's state does not.
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", triggered.stdout).group(1)
    worker = subprocess.run([prefect, "worker", "start", "--pool", "lowregret-process", "--type", "process",
                             "--run-once"], env=env | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    run = _get_json(f"{real_stack.prefect_api_url}/flow_runs/{run_id}")
    assert run["deployment_id"] == deployment["id"]
    assert run["state_type"] == "COMPLETED", worker.stdout[-3000:]
    # Same data, config and code as the direct run above: the registry keeps version 1 as champion.
    assert _champion(real_stack)["version"] == "1"


def test_sweep_fans_out_over_a_local_dask_cluster_of_two_workers(real_stack, tmp_path, tiny_models):
    """`lowregret sweep --runner dask --workers 2`: the grid's cells train at the same time."""
    pytest.importorskip("prefect_dask", reason="prefect-dask not installed (infra/requirements-server.txt)")
    pytest.importorskip("flows.sweep", reason="the sweep flow (flows/sweep.py) is not on this branch yet")
    base = [f"base.{option}" for option in _pipeline_args(tiny_models("llama"))]
    done = _lowregret(["sweep", "--runner", "dask", "--workers", "2", "--workdir", str(tmp_path), *base,
                       "base.name=tiny-sweep", "methods=[lora]", "ranks=[4]", "lora_lrs=[1e-4, 1e-3]"],
                      _client_env(real_stack, tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (flow_run,) = _post_json(f"{real_stack.prefect_api_url}/flow_runs/filter",
                             {"flows": {"name": {"any_": ["lowregret-sweep"]}}})
    assert flow_run["state_type"] == "COMPLETED"
    task_runs = _post_json(f"{real_stack.prefect_api_url}/task_runs/filter",
                           {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    cells = sorted((run["start_time"], run["end_time"]) for run in task_runs if run["name"].startswith("train_cell"))
    assert len(cells) == 2
    (first_start, first_end), (second_start, _) = cells
    assert second_start < first_end, f"the two cells ran one after the other, not fanned out: {cells}"
