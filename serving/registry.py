"""Registry references (`NAME@ALIAS`, `NAME@VERSION`) to local adapter directories.

flows.registry registers each adapter as an MLflow model version whose run keeps the raw peft
directory as the artifact `peft_adapter` and whose version tags record `base_model`. This module
resolves the alias or version with MLflow's client, downloads that directory once into
`.lowregret/serve-cache/NAME/VERSION` (a version's files never change, so the cache needs no
invalidation), and returns it with the version and base model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from data.errors import UserError
from serving.adapters import ResolvedSource


def _split(ref: str) -> tuple[str, str]:
    name, _, alias_or_version = ref.partition("@")
    return name, alias_or_version


def download_adapter(ref: str, cache_dir: str | Path | None = None) -> ResolvedSource:
    """Resolve `ref` in the MLflow model registry and download its peft directory.

    Args:
        ref: `NAME@ALIAS` (e.g. `facts@champion`) or `NAME@VERSION` (e.g. `facts@3`).
        cache_dir: where downloads are kept; default `.lowregret/serve-cache` of the flows settings.

    Raises:
        UserError: no registry support installed, or the name / alias / version is unknown.
    """
    try:
        from flows import registry
        from flows.settings import load_settings
    except ModuleNotFoundError as exc:
        raise UserError(
            f"{ref!r} is a registry reference, but this install has no flows.registry (MLflow registry "
            "support). Pass a local adapter directory instead (--adapter-dir name=PATH)."
        ) from exc
    from mlflow.exceptions import MlflowException

    settings = load_settings()
    client = registry.open_registry(settings)  # no registry here: refused, none created
    name, alias_or_version = _split(ref)
    try:
        if alias_or_version.isdigit():
            version = client.get_model_version(name, alias_or_version)
        else:
            version = client.get_model_version_by_alias(name, alias_or_version)
    except MlflowException as exc:
        raise UserError(
            f"The registry at {settings.registry_uri} has no {ref!r} ({exc.message.splitlines()[0]}). "
            "Check the name and alias/version (`mlflow ui`, or `lowregret` promotion commands)."
        ) from None
    if not version.run_id:
        raise UserError(
            f"{name} v{version.version} was registered without a run: its peft directory cannot be found."
        )

    target = Path(cache_dir or settings.home / "serve-cache") / name / str(version.version)
    if not (target / "adapter_config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Download beside the target and rename, so an interrupted download is never used.
        scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            local = client.download_artifacts(version.run_id, registry.ADAPTER_ARTIFACT, str(scratch))
        except MlflowException as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            raise UserError(
                f"{name} v{version.version}: its run {version.run_id} has no {registry.ADAPTER_ARTIFACT!r} "
                f"artifact ({exc.message.splitlines()[0]}); register it with flows.registry."
            ) from None
        if target.exists():  # another process finished first
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            os.replace(local, target)
            shutil.rmtree(scratch, ignore_errors=True)
    return ResolvedSource(
        path=target, version=str(version.version), base_model=version.tags.get("base_model")
    )
