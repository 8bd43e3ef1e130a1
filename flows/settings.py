"""Where the flows keep their state: embedded defaults so one command works on a laptop.

MLflow tracking and registry live in SQLite at `.lowregret/mlflow.db` with artifacts under
`.lowregret/mlartifacts` (MLflow 3's file store is deprecated, DESIGN.md). Prefect talks to its
ephemeral local server (started on demand, no `prefect server start`) unless `PREFECT_API_URL`
is set, and persists cached task results (the FullFT baseline) under `.lowregret/prefect`.
Every default yields to the variable the user already set: `MLFLOW_TRACKING_URI`,
`MLFLOW_REGISTRY_URI`, `PREFECT_API_URL`, `PREFECT_RESULTS_LOCAL_STORAGE_PATH`.

Prefect reads its settings when it is imported, so `apply_environment` must run before the
first `import prefect` (the CLI handlers do that); code that already imported Prefect wraps its
runs in `prefect_overrides`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from data.errors import UserError

HOME_DIRNAME = ".lowregret"
# Prefect's default startup wait is 20 s; the ephemeral server takes ~30 s on 2 busy CPU cores.
EPHEMERAL_STARTUP_TIMEOUT_S = 120


@dataclass(frozen=True)
class FlowSettings:
    """Resolved locations.

    Attributes:
        home: the `.lowregret` folder in the working directory.
        tracking_uri: MLflow tracking URI.
        registry_uri: MLflow model-registry URI (the tracking URI unless set apart).
        artifact_root: URI new MLflow experiments store their artifacts under.
        result_storage: folder for Prefect's persisted task results (the cached baseline).
        prefect_api_url: the Prefect server the user configured, or None for the ephemeral one.
        runs_dir: where training runs write their output directories.
        reports_dir: where plan reports are written.
    """

    home: Path
    tracking_uri: str
    registry_uri: str
    artifact_root: str
    result_storage: Path
    prefect_api_url: str | None
    runs_dir: Path
    reports_dir: Path


def load_settings(workdir: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> FlowSettings:
    """Settings for `workdir` (default: the current directory), honouring the user's variables."""
    env = os.environ if environ is None else environ
    root = Path(workdir or os.getcwd()).resolve()
    home = root / HOME_DIRNAME
    tracking_uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    registry_uri = env.get("MLFLOW_REGISTRY_URI") or tracking_uri
    storage = env.get("PREFECT_RESULTS_LOCAL_STORAGE_PATH") or env.get("PREFECT_LOCAL_STORAGE_PATH")
    return FlowSettings(
        home=home,
        tracking_uri=tracking_uri,
        registry_uri=registry_uri,
        artifact_root=(home / "mlartifacts").as_uri(),
        result_storage=Path(storage) if storage else home / "prefect" / "storage",
        prefect_api_url=env.get("PREFECT_API_URL") or None,
        runs_dir=root / "runs",
        reports_dir=root / "reports",
    )


def _defaults(settings: FlowSettings) -> dict[str, str]:
    values = {
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "MLFLOW_REGISTRY_URI": settings.registry_uri,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(settings.result_storage),
        # Telemetry writes race the first flow run on SQLite ("database is locked" noise).
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    if settings.prefect_api_url is None:
        values["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"
        values["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(EPHEMERAL_STARTUP_TIMEOUT_S)
    return values


def apply_environment(settings: FlowSettings | None = None, create_folders: bool = True) -> FlowSettings:
    """Export the defaults into `os.environ` (keeping every variable already set) and make the
    `.lowregret` folders (unless `create_folders` is false). Call before importing Prefect or MLflow."""
    settings = settings or load_settings()
    for key, value in _defaults(settings).items():
        os.environ.setdefault(key, value)
    if create_folders:
        prepare_folders(settings)
    return settings


def prepare_folders(settings: FlowSettings) -> None:
    """Create the local folders the SQLite store and result storage need."""
    _sqlite_folders(settings)
    settings.result_storage.mkdir(parents=True, exist_ok=True)


def _sqlite_folders(settings: FlowSettings) -> None:
    for uri in (settings.tracking_uri, settings.registry_uri):
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def prefect_overrides(settings: FlowSettings) -> Iterator[None]:
    """Point an already-imported Prefect at `settings.result_storage` for the duration."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    prepare_folders(settings)
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: settings.result_storage}):
        yield


def configure_mlflow(settings: FlowSettings) -> None:
    """Point MLflow's fluent API at the settings' tracking and registry stores (created if new)."""
    import mlflow

    _sqlite_folders(settings)
    initialize_store(settings)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)


@functools.cache
def initialize_store(settings: FlowSettings) -> None:
    """Create a local SQLite store's tables once, under a lock, before anything else opens it.

    MLflow creates and migrates a fresh database's schema when a store object is first made; two
    processes doing it at once fail with "duplicate column name" (seen with two `promote`s and with
    parallel pipelines on a fresh store). Under a flock of the database file (`flows.locks.hold_file`)
    the first process migrates and the others find the schema complete. Servers and other databases migrate on their side.
    """
    from flows.locks import hold_file

    for uri in sorted({settings.tracking_uri, settings.registry_uri}):
        if not uri.startswith("sqlite:///"):
            continue
        from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

        database = Path(uri.removeprefix("sqlite:///"))
        fix = (f"move {database} aside (it is the local MLflow store: runs and registered models) and run "
               "again to start a fresh one, or restore it from a backup; a read-only folder needs write access.")
        if database.is_file() and database.stat().st_size and database.open("rb").read(16) != b"SQLite format 3\x00":
            raise UserError(f"{database} is not an SQLite database (damaged or overwritten): {fix}")
        try:
            with hold_file(str(database)):
                TrackingStore(uri, settings.artifact_root)
                RegistryStore(uri)
        except UserError:
            raise
        except Exception as exc:  # sqlalchemy's DatabaseError / OperationalError, alembic's, OSError
            reason = " ".join(str(exc).split())[:200]
            raise UserError(f"The MLflow store {database} cannot be opened ({type(exc).__name__}: {reason}): {fix}") from None


def ensure_experiment(name: str, settings: FlowSettings) -> str:
    """The id of experiment `name`, creating it if needed.

    With a local store (SQLite or files) its artifacts go under `settings.artifact_root`; with a
    tracking server the server chooses (its artifact store, e.g. S3), so adapters never stay on
    the training machine's disk.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    local_store = settings.tracking_uri.startswith(("sqlite:", "file:", "/"))
    location = f"{settings.artifact_root}/{name}" if local_store else None
    return client.create_experiment(name, artifact_location=location)
