"""The deployment files in infra/ parse and carry what docs/PRODUCTION.md relies on.

Nothing here starts a container or a cluster (this machine has no Docker engine or Kubernetes):
the compose file and the Kubernetes template are only parsed and rendered. The accelerate configs
go through accelerate's own `launch` validation, and the job template through Prefect's own
work-pool validation and templating.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
COMPOSE = INFRA / "docker-compose.yml"
K8S_TEMPLATE = INFRA / "k8s" / "gpu-job-template.json"
ACCELERATE = INFRA / "accelerate"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_every_yaml_and_json_in_infra_parses():
    files = sorted(INFRA.rglob("*.yml")) + sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.json"))
    assert len(files) >= 5, files
    for path in files:
        doc = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        assert isinstance(doc, dict), path


def test_compose_has_the_stack_services_with_pinned_images_and_healthchecks():
    services = _compose()["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
        if name != "minio-init":  # a one-shot job: compose waits for it to exit instead
            assert service["healthcheck"]["test"], name


def test_compose_mlflow_uses_postgres_store_and_s3_artifacts():
    mlflow = _compose()["services"]["mlflow"]
    env = mlflow["environment"]
    # The server reads these two as its --backend-store-uri / --artifacts-destination envvars.
    assert re.fullmatch(r"postgresql\+psycopg://\$\{POSTGRES_USER[^}]*\}:\$\{POSTGRES_PASSWORD[^}]*\}@postgres:5432/mlflow",
                        env["MLFLOW_BACKEND_STORE_URI"])
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert "--host=0.0.0.0" in command
    allowed = next(arg for arg in command if arg.startswith("--allowed-hosts=")).split("=", 1)[1]
    from mlflow.server.security_utils import is_allowed_host_header

    hosts = allowed.split(",")
    assert is_allowed_host_header(hosts, "mlflow:5000"), "other containers call the server mlflow:5000"
    assert is_allowed_host_header(hosts, "localhost:5000")
    assert not is_allowed_host_header(hosts, "attacker.example.com")
    from tests.infra.stack import MLFLOW_ALLOWED_HOSTS

    assert allowed == MLFLOW_ALLOWED_HOSTS, "the real-server test must run the compose setting"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_compose_prefect_server_and_worker_wiring():
    services = _compose()["services"]
    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    worker = services["prefect-worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["command"][:3] == ["prefect", "worker", "start"]
    assert "--type=process" in worker["command"]
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"


def test_compose_postgres_creates_the_prefect_database_and_binds_loopback_only():
    compose = _compose()
    postgres = compose["services"]["postgres"]
    assert postgres["environment"]["POSTGRES_DB"] == "mlflow"
    init = next(v for v in postgres["volumes"] if "docker-entrypoint-initdb.d" in v)
    sql = (COMPOSE.parent / init.split(":")[0]).read_text()
    assert "CREATE DATABASE prefect" in sql
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_bucket_job_is_one_shell_string():
    entrypoint = _compose()["services"]["minio-init"]["entrypoint"]
    # `sh -c` runs only its first argument: the whole script must be a single list item.
    assert entrypoint[:2] == ["/bin/sh", "-c"] and len(entrypoint) == 3
    assert "mc mb --ignore-existing" in entrypoint[2]


def test_compose_every_variable_is_documented_in_env_example():
    used = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    example = (INFRA / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_]+)=", example, flags=re.M))
    assert used <= defined, used - defined


def _k8s_template() -> dict:
    return json.loads(K8S_TEMPLATE.read_text())


def test_k8s_template_passes_prefect_work_pool_validation():
    from prefect.server.schemas.actions import WorkPoolCreate

    WorkPoolCreate(name="lowregret-gpu", type="kubernetes", base_job_template=_k8s_template())


def test_k8s_template_renders_a_gpu_job_with_defaults():
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    template = _k8s_template()
    defaults = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    config = apply_values(template["job_configuration"], defaults | {"gpu_count": 8})
    pod = config["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert "cpu" not in container["resources"]["limits"], "no CPU limit by default (throttles data loading)"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = {item["name"]: item for item in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://")
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert not re.search(r"\{\{.*\}\}", json.dumps(config["job_manifest"])), "unrendered placeholder"


@pytest.mark.parametrize(
    ("name", "distributed", "machines", "processes"),
    [("ddp-1node", "MULTI_GPU", 1, 8), ("fsdp-1node", "FSDP", 1, 8), ("fsdp-2node", "FSDP", 2, 16)],
)
def test_accelerate_config_passes_accelerate_launch_validation(name, distributed, machines, processes):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = ACCELERATE / f"{name}.yaml"
    config = load_config_from_file(str(path))  # rejects unknown top-level keys
    assert config.distributed_type.value == distributed
    assert (config.num_machines, config.num_processes) == (machines, processes)
    assert config.mixed_precision == "bf16"

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)  # what `accelerate launch` hands torchrun's workers
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if distributed == "FSDP":
        assert env["FSDP_VERSION"] == "2"
        assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"  # FSDP2's FULL_SHARD
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    if machines > 1:
        assert args.main_process_ip and args.main_process_port


def test_fsdp_config_builds_accelerate_fsdp_plugin(monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / "fsdp-1node.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading is True
