"""The deployment files in infra/ parse and carry what docs/PRODUCTION.md relies on.

Nothing here starts a container or a cluster (this machine has no Docker engine or Kubernetes):
the compose file and the Kubernetes files are only parsed and rendered. The multi-node JobSet's
command goes through the trainer's own config loader, and the job template through Prefect's own
work-pool validation and templating.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
COMPOSE = INFRA / "docker-compose.yml"
K8S_TEMPLATE = INFRA / "k8s" / "gpu-job-template.json"
JOBSET = INFRA / "k8s" / "train-jobset.yaml"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_every_yaml_and_json_in_infra_parses():
    files = sorted(INFRA.rglob("*.yml")) + sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.json"))
    assert len(files) >= 3, files  # compose, the k8s job template, the multi-node JobSet
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


def test_train_jobset_starts_one_launcher_per_node_that_meet_at_node_0():
    """infra/k8s/train-jobset.yaml: every pod runs the same `lowregret train` with its JobSet job index as
    launch.node_rank; replicas = launch.nodes, GPUs = launch.processes, the address is node 0's DNS name."""
    import shlex

    from trainer.config import load_config

    jobset = yaml.safe_load(JOBSET.read_text())
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    [node] = jobset["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['jobset.sigs.k8s.io/job-index']"
    words = shlex.split(container["args"][0].replace("$NODES", str(node["replicas"])).replace("$NODE_RANK", "1"))
    assert words[:3] == ["exec", "lowregret", "train"]
    overrides = [w for w in words[3:] if "=" in w and not w.startswith("--")]
    config = load_config(None, overrides)  # every option is a real one, every value valid
    launch = config.launch
    assert (launch.nodes, launch.node_rank) == (node["replicas"], 1)
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert launch.processes == gpus == container["resources"]["requests"]["nvidia.com/gpu"]
    name = jobset["metadata"]["name"]
    assert launch.main_address == f"{name}-{node['name']}-0-0.{name}"  # JobSet's pod DNS name of node 0
    assert launch.main_port == container["ports"][0]["containerPort"]
    assert config.output_dir.startswith("/data/") and config.resume == "auto"
    assert pod["restartPolicy"] == "Never" and node["template"]["spec"]["backoffLimit"] == 0
