"""Registry references (`NAME@ALIAS`, `NAME@VERSION`) to local adapter directories, via flows.registry."""

from __future__ import annotations

from planner.errors import UserError
from serving.adapters import ResolvedSource


def download_adapter(ref: str) -> ResolvedSource:
    """Resolve `ref` in the MLflow model registry and download its peft directory.

    Raises:
        UserError: the registry module is missing, or the name / alias / version is unknown.
    """
    try:
        from flows import registry
    except ModuleNotFoundError as exc:
        raise UserError(
            f"{ref!r} is a registry reference, but this install has no flows.registry (MLflow registry "
            "support). Pass a local adapter directory instead (--adapter-dir name=PATH)."
        ) from exc
    raise UserError(
        f"flows.registry has no adapter download this server knows how to call ({registry.__name__})."
    )
