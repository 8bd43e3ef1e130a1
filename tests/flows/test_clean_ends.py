"""Clean ends, with real signals on a real `lowregret pipeline` process: SIGTERM leaves its MLflow
runs KILLED (Prefect's on_crashed hook); kill -9 takes the ephemeral Prefect server down with it,
and the run it left RUNNING is ended KILLED by the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flows.test_pipeline import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")]


def _long_pipeline(tiny_models, workdir: Path, name: str, env: dict, log: Path) -> subprocess.Popen:
    """A pipeline whose FullFT baseline trains for far longer than the test waits."""
    overrides = tiny_overrides(tiny_models("llama"), name=name, **{"train.max_steps": 100000})
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "pipeline", "--workdir", str(workdir), *overrides],
                                cwd=REPO, env=env | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                                stdout=out, stderr=subprocess.STDOUT)


def _client(workdir: Path):
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{workdir / '.lowregret' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=db, registry_uri=db)


def _wait_for_parent_run(workdir: Path, name: str, proc, log: Path, timeout_s: float = 300):
    """The pipeline's parent MLflow run, once it exists and training has begun."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the pipeline ended ({proc.returncode}) before it could be stopped:\n{log.read_text()[-3000:]}")
        if "trainable parameters" in log.read_text() and (workdir / ".lowregret" / "mlflow.db").is_file():
            experiment = _client(workdir).get_experiment_by_name(f"lowregret/{name}")
            runs = _client(workdir).search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{name} pipeline'")
            if runs:
                return runs[0]
        time.sleep(0.5)
    pytest.fail(f"no parent run after {timeout_s} s:\n{log.read_text()[-3000:]}")


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append((int(entry.name), cmdline))
    return found


def _gone(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"  # ended, not reaped
    except OSError:
        return True


def test_sigterm_ends_the_pipelines_mlflow_runs_killed(prefect_harness, tiny_models, tmp_path):
    from prefect.settings import PREFECT_API_URL

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    log = tmp_path / "pipeline.log"
    proc = _long_pipeline(tiny_models, work, "tiny-sigterm", env | {"PREFECT_API_URL": PREFECT_API_URL.value()}, log)
    try:
        parent = _wait_for_parent_run(work, "tiny-sigterm", proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        proc.kill()
    ended = _client(work).get_run(parent.info.run_id)
    assert ended.info.status == "KILLED", log.read_text()[-3000:]
    assert "CRASHED" in ended.data.tags["lowregret.ended_by"]
    experiment = ended.info.experiment_id
    assert not _client(work).search_runs([experiment], "attributes.status = 'RUNNING'")


def test_kill_9_takes_the_ephemeral_server_down_and_the_next_start_ends_the_run(tiny_models, tmp_path):
    from flows import tasks
    from flows.settings import load_settings

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    log = tmp_path / "pipeline.log"
    proc = _long_pipeline(tiny_models, work, "tiny-kill", env | {"PREFECT_HOME": str(tmp_path / "prefect-home")}, log)
    try:
        parent = _wait_for_parent_run(work, "tiny-kill", proc, log)
        servers = [pid for pid, cmdline in _children(proc.pid) if "flows.server_guard" in cmdline]
        assert len(servers) == 1, _children(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while not _gone(servers[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(servers[0]), "the ephemeral Prefect server outlived its pipeline"

    assert _client(work).get_run(parent.info.run_id).info.status == "RUNNING"  # no hook ran
    settings = load_settings(work, environ={})
    tasks.start_tracking.fn(settings, "lowregret/tiny-kill", "pipeline", {})  # what the next pipeline does first
    ended = _client(work).get_run(parent.info.run_id)
    assert ended.info.status == "KILLED" and "process had ended" in ended.data.tags["lowregret.ended_by"]
