"""Prefect's ephemeral API server for one command, ended with the command even by kill -9.

Prefect starts its ephemeral server (`SubprocessASGIServer`: uvicorn in a child process) on demand
and stops it at exit, but a process killed outright runs no exit handler, and the orphaned server
lived on. Here the CLI starts that same server itself, under `flows.server_guard`, which watches its
parent and shuts the server down when the parent is gone; its URL is exported as PREFECT_API_URL, so
the flow, its tasks and a process task runner's workers all use this one server.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from prefect.server.api.server import SubprocessASGIServer

from flows.settings import EPHEMERAL_STARTUP_TIMEOUT_S


class GuardedServer(SubprocessASGIServer):
    """Prefect's ephemeral server, run under `flows.server_guard` with this process as its parent."""

    def _run_uvicorn_command(self) -> subprocess.Popen:
        import prefect
        from prefect.settings import get_current_settings

        # Prefect 3.8's own command and environment (prefect/server/api/server.py,
        # SubprocessASGIServer._run_uvicorn_command), with `-m uvicorn` run through the guard.
        root = str(Path(__file__).resolve().parent.parent)  # so `-m flows.server_guard` imports
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True),
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        return subprocess.Popen(
            [sys.executable, "-m", "flows.server_guard", str(os.getpid()),
             "--app-dir", str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env,
        )


@contextlib.contextmanager
def prefect_server(settings) -> Iterator[None]:
    """Prefect's API for the block: the configured server (PREFECT_API_URL, from the environment, a
    Prefect profile or a test harness), or a guarded ephemeral one that is stopped at the end of the
    block (and by its guard if this process dies first)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if settings.prefect_api_url is not None or PREFECT_API_URL.value():
        yield
        return

    server = GuardedServer()
    server.start(timeout=EPHEMERAL_STARTUP_TIMEOUT_S)
    os.environ["PREFECT_API_URL"] = server.api_url  # a process task runner's workers inherit it
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
