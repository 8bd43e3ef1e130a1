"""MLflow runs end with their flow: FINISHED, FAILED, or KILLED, never RUNNING forever.

Every MLflow run the flows create is tagged with its owner: the Prefect flow run
(`lowregret.flow_run_id`) and the process (`lowregret.host`, `lowregret.pid`,
`lowregret.pid_start`). Then:
- a flow that fails (an exception), crashes (SIGTERM, Ctrl-C) or is cancelled runs Prefect's
  state hooks (`on_failure`, `on_crashed`, `on_cancellation`), which end its RUNNING runs FAILED or
  KILLED (`end_flow_runs`);
- a process killed outright (kill -9, power loss) runs no hook: the next flow in the same
  experiment ends the runs whose owner process on this host is gone (`end_orphaned_runs`).
  Runs owned by another host are left alone, as their process cannot be checked from here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

FLOW_RUN_TAG = "lowregret.flow_run_id"
HOST_TAG = "lowregret.host"
PID_TAG = "lowregret.pid"
PID_START_TAG = "lowregret.pid_start"
ENDED_BY_TAG = "lowregret.ended_by"


def owner_tags() -> dict[str, str]:
    """Tags naming the process and Prefect flow run that own a new MLflow run."""
    from prefect.runtime import flow_run

    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: _start_ticks(os.getpid())}
    if flow_run.id:
        tags[FLOW_RUN_TAG] = str(flow_run.id)
    return tags


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is told apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after "pid (comm)"


def _alive(pid: int, start_ticks: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return True  # not Linux: the pid exists, assume it is the owner
    return fields[0] != "Z" and (not start_ticks or fields[19] == start_ticks)  # a zombie has ended


def end_orphaned_runs(client, experiment_id: str) -> list[str]:
    """End (KILLED) the RUNNING runs of `experiment_id` whose owner process on this host is gone.

    Returns:
        The ids of the runs it ended.
    """
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'")
    ended = []
    for run in runs:
        tags = run.data.tags
        if PID_TAG in tags and not _alive(int(tags[PID_TAG]), tags.get(PID_START_TAG, "")):
            client.set_tag(run.info.run_id, ENDED_BY_TAG, "next start: its process had ended without closing it")
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def end_flow_runs(client, flow_run_id: str, status: str, reason: str) -> list[str]:
    """End every RUNNING MLflow run owned by Prefect flow run `flow_run_id` with `status`."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiments:
        return []
    runs = client.search_runs(experiments, f"attributes.status = 'RUNNING' and tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")
    for run in runs:
        client.set_tag(run.info.run_id, ENDED_BY_TAG, reason)
        client.set_terminated(run.info.run_id, status)
    return [run.info.run_id for run in runs]


def _hook(status: str):
    def end_runs(flow, flow_run, state) -> None:
        from flows.registry import client_for
        from flows.settings import load_settings

        settings = load_settings(flow_run.parameters.get("workdir"))
        end_flow_runs(client_for(settings), str(flow_run.id), status,
                      f"flow run {flow_run.name} ended {state.type.value}: {state.message or state.name}"[:5000])

    end_runs.__name__ = f"end_mlflow_runs_{status.lower()}"
    return end_runs


# Prefect state hooks for a flow that creates MLflow runs: a failure leaves them FAILED; a crash
# (SIGTERM, SIGINT, a dying worker) or a cancellation leaves them KILLED.
STATE_HOOKS = {"on_failure": [_hook("FAILED")], "on_crashed": [_hook("KILLED")],
               "on_cancellation": [_hook("KILLED")]}
