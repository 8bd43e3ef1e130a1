"""Real PostgreSQL, MLflow and Prefect servers on loopback ports, for tests and for trying things.

The same shape as infra/docker-compose.yml without containers: one Postgres with an `mlflow` and a
`prefect` database (password auth, as in production), `mlflow server` on the Postgres backend store
with a local directory as its artifact destination, and `prefect server start` on Postgres.

    with real_stack() as stack:            # tests use the `real_stack` fixture
        stack.env  # {"MLFLOW_TRACKING_URI": "http://127.0.0.1:…", "PREFECT_API_URL": "http://…/api"}

Everything binds 127.0.0.1 on free ports and is stopped on exit, also when the body fails.
`python -m tests.infra.stack` starts the stack, prints the exports and waits for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PG_USER = "lowregret"
# The same list infra/docker-compose.yml passes, so a test exercises the compose setting.
MLFLOW_ALLOWED_HOSTS = "mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"


class StackUnavailable(RuntimeError):
    """A binary or driver the stack needs is missing; the message says which and how to get it."""


def find_pg_bin() -> Path:
    """Directory of the PostgreSQL server binaries (Debian: /usr/lib/postgresql/<major>/bin)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if candidates:
        return Path(candidates[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).resolve().parent
    raise StackUnavailable("PostgreSQL server binaries not found (apt-get install -y postgresql; scripts/ci-services.sh)")


def check_drivers() -> None:
    """MLflow's postgresql+psycopg:// store needs psycopg 3; Prefect's postgresql+asyncpg:// asyncpg."""
    missing = [name for name in ("psycopg", "asyncpg") if importlib.util.find_spec(name) is None]
    if missing:
        raise StackUnavailable(
            f"Python driver(s) {', '.join(missing)} not installed in {sys.prefix} "
            "(psycopg[binary] for MLflow on Postgres, asyncpg for Prefect server on Postgres)"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    """Addresses of a running stack and the environment that points clients at it."""

    root: Path
    pg_port: int
    mlflow_url: str
    prefect_api_url: str
    artifacts_dir: Path
    pg_password: str
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.mlflow_url, "PREFECT_API_URL": self.prefect_api_url}

    def pg_uri(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{PG_USER}:{self.pg_password}@127.0.0.1:{self.pg_port}/{database}"

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {name} ({path}) ---\n{text[-chars:]}")
        return "\n".join(parts)


def _as_postgres_user() -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` system user then."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise StackUnavailable("running as root and no `postgres` user to run the server as") from exc
    return ["runuser", "-u", "postgres", "--"]


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float, name: str, stack: Stack, host: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before becoming healthy\n{stack.log_tail()}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"{name} not healthy at {url} after {timeout_s:.0f} s\n{stack.log_tail()}")


def _stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process group this module started (servers fork workers), SIGKILL if it hangs."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def _start_postgres(pg_bin: Path, stack: Stack) -> list[str]:
    """initdb + pg_ctl start; returns the pg_ctl stop command."""
    prefix = _as_postgres_user()
    data = stack.root / "pgdata"
    pwfile = stack.root / "pgpass"
    pwfile.write_text(stack.pg_password + "\n")
    if prefix:
        shutil.chown(stack.root, "postgres")
        shutil.chown(pwfile, "postgres")
    log = stack.root / "postgres.log"
    stack.logs["postgres"] = log
    subprocess.run(
        [*prefix, str(pg_bin / "initdb"), "-D", str(data), "-U", PG_USER, "--pwfile", str(pwfile),
         "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"],
        check=True, capture_output=True, text=True,
    )
    options = f"-c listen_addresses=127.0.0.1 -p {stack.pg_port} -c unix_socket_directories={data} -c fsync=off"
    subprocess.run(
        [*prefix, str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
        check=True, capture_output=True, text=True,
    )
    env = dict(os.environ, PGPASSWORD=stack.pg_password)
    for database in ("mlflow", "prefect"):
        subprocess.run(
            [str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(stack.pg_port), "-U", PG_USER, database],
            check=True, capture_output=True, text=True, env=env,
        )
    return [*prefix, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]


def _spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


@contextlib.contextmanager
def real_stack(startup_timeout_s: float = 180.0) -> Iterator[Stack]:
    """Start Postgres, MLflow and Prefect servers; yield their addresses; stop all of them."""
    pg_bin = find_pg_bin()
    check_drivers()
    # Not under pytest's tmp_path: that is 0700 root, and the postgres user must reach its data dir.
    root = Path(tempfile.mkdtemp(prefix="lowregret-stack-"))
    root.chmod(0o755)
    stack = Stack(
        root=root,
        pg_port=free_port(),
        mlflow_url=f"http://127.0.0.1:{free_port()}",
        prefect_api_url=f"http://127.0.0.1:{free_port()}/api",
        artifacts_dir=root / "mlflow-artifacts",
        pg_password=secrets.token_hex(12),
    )
    pg_stop: list[str] | None = None
    mlflow_proc = prefect_proc = None
    try:
        pg_stop = _start_postgres(pg_bin, stack)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
        bin_dir = Path(sys.executable).parent

        stack.artifacts_dir.mkdir()
        stack.logs["mlflow"] = root / "mlflow.log"
        mlflow_port = stack.mlflow_url.rsplit(":", 1)[1]
        mlflow_proc = _spawn(
            [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", mlflow_port, "--workers", "1",
             "--backend-store-uri", stack.pg_uri("mlflow"),
             "--artifacts-destination", stack.artifacts_dir.as_uri(),
             "--allowed-hosts", MLFLOW_ALLOWED_HOSTS],
            stack.logs["mlflow"], base_env, root,
        )

        prefect_home = root / "prefect-home"
        prefect_port = stack.prefect_api_url.split(":")[2].split("/")[0]
        prefect_env = dict(
            base_env,
            PREFECT_HOME=str(prefect_home),
            PREFECT_API_DATABASE_CONNECTION_URL=stack.pg_uri("prefect", "postgresql+asyncpg"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING",
        )
        stack.logs["prefect"] = root / "prefect.log"
        prefect_proc = _spawn(
            [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", prefect_port],
            stack.logs["prefect"], prefect_env, root,
        )

        _wait_http(f"{stack.mlflow_url}/health", mlflow_proc, startup_timeout_s, "mlflow server", stack)
        _wait_http(f"{stack.prefect_api_url}/health", prefect_proc, startup_timeout_s, "prefect server", stack)
        yield stack
    finally:
        _stop(prefect_proc)
        _stop(mlflow_proc)
        if pg_stop:
            subprocess.run(pg_stop, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    try:
        with real_stack() as stack:
            print(f"export MLFLOW_TRACKING_URI={stack.mlflow_url}")
            print(f"export PREFECT_API_URL={stack.prefect_api_url}")
            print(f"# Postgres: {stack.pg_uri('mlflow')}  (logs and data in {stack.root}; Ctrl-C stops all)")
            sys.stdout.flush()
            # Blocked only now, after the servers started, so they do not inherit the mask.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except StackUnavailable as exc:
        print(f"stack unavailable: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
