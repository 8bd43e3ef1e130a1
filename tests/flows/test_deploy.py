"""`lowregret deploy`: a cron-scheduled Prefect deployment of the pipeline, served by a real
`lowregret deploy` process; a run of it triggered here completes on a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flows.test_pipeline import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _wait_for_deployment(client, name: str, proc, log: Path, timeout_s: float):
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"lowregret deploy exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            time.sleep(1)
    pytest.fail(f"no deployment {name} after {timeout_s} s:\n{log.read_text()[-3000:]}")


def test_deploy_serves_the_cron_schedule_and_a_triggered_run_completes(prefect_harness, tiny_models, tmp_path):
    import yaml
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    workdir = tmp_path / "scheduled"
    workdir.mkdir()
    config = tmp_path / "pipeline.yaml"
    options = dict(item.split("=", 1) for item in tiny_overrides(tiny_models("llama"), name="tiny-deploy"))
    config.write_text(yaml.safe_dump({k: yaml.safe_load(v) for k, v in options.items() if "." not in k}
                                     | {"train": {k.split(".", 1)[1]: yaml.safe_load(v)
                                                  for k, v in options.items() if "." in k}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env |= {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = tmp_path / "deploy.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "deploy", "--cron", "0 2 * * *", "--name", "nightly",
             "--config", str(config), "--workdir", str(workdir)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with get_client(sync_client=True) as client:
            deployment = _wait_for_deployment(client, "lowregret-pipeline/nightly", proc, log, 120)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
        assert deployment.parameters["config"]["name"] == "tiny-deploy"

        flow_run = run_deployment("lowregret-pipeline/nightly", timeout=240, poll_interval=2)
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read_text()[-3000:]}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    db = f"sqlite:///{workdir / '.lowregret' / 'mlflow.db'}"
    registry = MlflowClient(tracking_uri=db, registry_uri=db)
    assert str(registry.get_model_version_by_alias("tiny-deploy", "champion").version) == "1"


def test_deploy_to_a_work_pool_registers_the_schedule(prefect_harness, tiny_models, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.config import load_pipeline_config
    from flows.deploy import deploy_to_work_pool

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="cpu-pool", type="process"))
        config = load_pipeline_config(None, tiny_overrides(tiny_models("llama"), name="tiny-pool"))
        deployment_id = deploy_to_work_pool(config, "30 1 * * 1", "weekly", "cpu-pool", str(tmp_path))
        deployment = client.read_deployment(deployment_id)
    assert deployment.work_pool_name == "cpu-pool"
    assert deployment.entrypoint == "flows/pipeline.py:pipeline"
    assert [s.schedule.cron for s in deployment.schedules] == ["30 1 * * 1"]
    assert deployment.parameters["workdir"] == str(tmp_path.resolve())
    assert deployment.parameters["config"]["name"] == "tiny-pool"


def test_a_launched_pipeline_asks_its_kubernetes_job_for_as_many_gpus(prefect_harness, tiny_models, tmp_path):
    """The work pool's GPU count reaches the launcher: a deployment whose runs train on 2 processes asks
    the job template's `gpu_count` for 2 GPUs (and the launcher refuses a pod with fewer)."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.config import load_pipeline_config
    from flows.deploy import deploy_to_work_pool

    template = json.loads((REPO / "infra" / "k8s" / "gpu-job-template.json").read_text())
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="k8s-gpu", type="kubernetes", base_job_template=template))
        config = load_pipeline_config(None, tiny_overrides(tiny_models("llama"), name="tiny-gpus",
                                                           **{"train.launch.processes": 2}))
        deployment = client.read_deployment(deploy_to_work_pool(config, "0 3 * * *", "gpus", "k8s-gpu", str(tmp_path)))
    assert deployment.job_variables == {"gpu_count": 2}
    assert deployment.parameters["config"]["train"]["launch"] == {"processes": 2}
