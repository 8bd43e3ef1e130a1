"""The MLflow model registry for adapters: log, register, promote, roll back (MLflow 3 aliases).

Rules (docs/FLOWS.md says why):
- Nothing is logged or registered until the adapter directory checks out (`verify_adapter`).
- Only an adapter that passed the regret gate is registered; each registered version gets the
  alias `candidate`. A failed or regretful run moves no alias and registers nothing.
- `champion` moves to a new version only when it passed the gate AND its eval loss is at most
  the current champion's (`eval_loss` tag). The champion it replaces is pushed onto the model's
  `champion_history` tag and gets the alias `previous_champion`; `rollback` pops that history.
- Idempotence: a version is identified by its `run_fingerprint` tag (LoRA config hash + data
  fingerprint + code version + baseline key). Registering a fingerprint that already has a
  version returns that version and moves no alias, so a scheduled re-run of an unchanged
  pipeline cannot re-promote a version that was rolled back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CANDIDATE = "candidate"
# Version tags `lowregret models` shows: the pipeline writes them when it registers a version
# (flows/pipeline.py; the 95% paired interval and the PASS/FAIL/INCONCLUSIVE verdict of the gate).
EVAL_LOSS_TAG, REGRET_TAG = "eval_loss", "regret"
REGRET_CI_TAGS = ("regret_low", "regret_high")
VERDICT_TAG = "verdict"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"
HISTORY_TAG = "champion_history"  # registered-model tag: JSON list of past champion versions
FINGERPRINT_TAG = "run_fingerprint"
ADAPTER_ARTIFACT = "peft_adapter"  # the raw peft directory, as a run artifact (for vLLM)
MODEL_NAME = "model"  # the pyfunc's name inside the run
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterCheckError(RuntimeError):
    """The adapter directory is not a complete, loadable peft LoRA adapter."""


@dataclass(frozen=True)
class Registration:
    """Outcome of `register_adapter`: the version and whether this call created it."""

    name: str
    version: str
    created: bool


@dataclass(frozen=True)
class PromotionDecision:
    """What `promote_if_better` did and why (printed and logged as the run's verdict)."""

    name: str
    version: str
    promoted: bool
    reason: str
    previous_champion: str | None = None


def verify_adapter(adapter_dir: str | Path) -> dict:
    """Check an adapter directory before anything is registered.

    Returns:
        The adapter config as a dict.

    Raises:
        AdapterCheckError: a file is missing, the config does not load with peft, or the adapter
            saves whole modules (`modules_to_save`), which would ship full weights, not an adapter.
    """
    from peft import PeftConfig

    folder = Path(adapter_dir)
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise AdapterCheckError(f"adapter directory {folder} lacks {', '.join(missing)}")
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as exc:  # peft raises ValueError/TypeError/JSONDecodeError for bad configs
        raise AdapterCheckError(f"{folder / 'adapter_config.json'} does not load with peft: {exc}") from exc
    if getattr(config, "modules_to_save", None):
        raise AdapterCheckError(
            f"adapter in {folder} saves whole modules {config.modules_to_save}: not a pure LoRA adapter"
        )
    return config.to_dict()


def client_for(settings):
    """An MlflowClient on the settings' tracking and registry stores (a local SQLite store that exists is
    opened and checked first: `flows.settings.initialize_store` refuses a damaged one in one paragraph)."""
    from mlflow.tracking import MlflowClient

    from flows.settings import initialize_store

    if settings.registry_uri.startswith("sqlite:///") and Path(settings.registry_uri.removeprefix("sqlite:///")).is_file():
        initialize_store(settings)

    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)


def open_registry(settings):
    """A client on a registry that exists (for promote and rollback).

    Raises:
        UserError: the local SQLite registry does not exist (nothing was registered in this
            working directory); nothing is created.
    """
    from data.errors import UserError

    if settings.registry_uri.startswith("sqlite:///"):
        database = Path(settings.registry_uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise UserError(
                f"No model registry at {database}: nothing has been registered in {settings.home.parent}. "
                "Run `lowregret pipeline` there first, or pass the --workdir that holds .lowregret/ "
                "(or set MLFLOW_REGISTRY_URI)."
            )
    from flows.settings import configure_mlflow

    configure_mlflow(settings)
    return client_for(settings)


def log_adapter_model(run_id: str, adapter_dir: str | Path, base_model: str, work_dir: str | Path) -> str:
    """Log the verified adapter under `run_id` as a pyfunc model plus the raw peft directory.

    Args:
        run_id: the MLflow run (already created) the model belongs to.
        adapter_dir: peft adapter directory.
        base_model: the base model reference resolved at load time.
        work_dir: scratch folder for base_model.json.

    Returns:
        The logged model's URI (`models:/m-...`).
    """
    import mlflow

    import flows.pyfunc_model as pyfunc_model

    verify_adapter(adapter_dir)
    scratch = Path(work_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    base_ref = pyfunc_model.write_base_reference(scratch, base_model)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(adapter_dir), artifact_path=ADAPTER_ARTIFACT)
        # MLflow checks the input example by loading the model once and answering it (1 new token).
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=pyfunc_model.MODEL_CODE,  # models from code: no pickle to load
            artifacts={"adapter": str(adapter_dir), "base_model": str(base_ref)},
            signature=pyfunc_model.params_signature(),
            input_example=pyfunc_model.INPUT_EXAMPLE,
            pip_requirements=_requirements(),
        )
    return info.model_uri


def _requirements() -> list[str]:
    """What serving the pyfunc needs, pinned to the versions it was logged with (no inference:
    MLflow's inference would load the base model in a subprocess)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("mlflow", "torch", "transformers", "peft", "safetensors", "gguf", "lowregret"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def find_version(client, name: str, fingerprint: str):
    """The registered version of `name` tagged with `fingerprint`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return None
    matches = client.search_model_versions(f"name='{name}' and tags.{FINGERPRINT_TAG}='{fingerprint}'")
    return min(matches, key=lambda v: int(v.version)) if matches else None


def register_adapter(client, name: str, model_uri: str, fingerprint: str, tags: dict,
                     description: str | None = None) -> Registration:
    """Register `model_uri` as a new version of `name` with `tags`, `description` and alias `candidate`,
    unless a version with the same fingerprint exists (then return it, moving no alias)."""
    import mlflow

    existing = find_version(client, name, fingerprint)
    if existing is not None:
        return Registration(name=name, version=str(existing.version), created=False)
    all_tags = {key: str(value) for key, value in tags.items()} | {FINGERPRINT_TAG: fingerprint}
    version = mlflow.register_model(model_uri, name, tags=all_tags)
    if description:
        client.update_model_version(name, version.version, description=description)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return Registration(name=name, version=str(version.version), created=True)


def current_champion(client, name: str):
    """The version that holds `@champion`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def promote_if_better(client, name: str, version: str, *, passed: bool, eval_loss: float | None = None,
                      eval_reward: float | None = None) -> PromotionDecision:
    """Give `version` the champion alias if it passed the gate and does not lose to the champion:
    by held-out loss (lower is better; SFT) or, when `eval_reward` is given, by held-out reward
    (higher is better; RL). A champion without that tag (another objective) does not block."""
    metric, value = ("eval_reward", eval_reward) if eval_reward is not None else ("eval_loss", eval_loss)
    words = metric.replace("_", " ")
    champion = current_champion(client, name)
    if not passed:
        return PromotionDecision(name, version, False, "regret gate failed")
    if client.get_model_version(name, version).tags.get("rolled_back"):
        return PromotionDecision(name, version, False, "version was rolled back")
    if champion is not None:
        if str(champion.version) == str(version):
            return PromotionDecision(name, version, False, "already champion")
        held = champion.tags.get(metric)
        if held is not None and (value < float(held) if metric == "eval_reward" else value > float(held)):
            relation = "<" if metric == "eval_reward" else ">"
            return PromotionDecision(
                name, version, False,
                f"{words} {value:.4f} {relation} champion v{champion.version}'s {float(held):.4f}",
                previous_champion=str(champion.version),
            )
    previous = _move_champion(client, name, version)
    relation = ">=" if metric == "eval_reward" else "<="
    reason = "first champion" if previous is None else f"{words} {value:.4f} {relation} champion v{previous}'s"
    return PromotionDecision(name, version, True, reason, previous_champion=previous)


def promote(client, name: str, version: str, reason: str) -> PromotionDecision:
    """Force `version` to champion (an operator's decision), recording the reason on the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        from data.errors import UserError

        raise UserError(f"{name!r} has no version {version!r}: list them with `lowregret models {name}`.") from exc
    client.set_model_version_tag(name, version, "promoted_reason", reason)
    if "rolled_back" in client.get_model_version(name, version).tags:
        client.delete_model_version_tag(name, version, "rolled_back")
    champion = current_champion(client, name)
    if champion is not None and str(champion.version) == str(version):
        return PromotionDecision(name, version, False, "already champion")
    previous = _move_champion(client, name, version)
    return PromotionDecision(name, version, True, f"forced: {reason}", previous_champion=previous)


def rollback(client, name: str, reason: str = "rollback") -> PromotionDecision:
    """Restore the previous champion; the demoted version is tagged `rolled_back`.

    Raises:
        UserError: the model has no earlier champion to return to.
    """
    from data.errors import UserError

    history = _history(client, name)
    champion = current_champion(client, name)
    if not history or champion is None:
        raise UserError(f"{name!r} has no previous champion to roll back to.")
    restored = history.pop()
    client.set_model_version_tag(name, champion.version, "rolled_back", reason)
    client.set_registered_model_alias(name, CHAMPION, restored)
    _set_history(client, name, history)
    return PromotionDecision(name, restored, True, f"rolled back from v{champion.version}: {reason}",
                             previous_champion=str(champion.version))


def _move_champion(client, name: str, version: str) -> str | None:
    """Point `champion` at `version`; push the old champion onto the history. Returns the old one."""
    champion = current_champion(client, name)
    history = _history(client, name)
    if champion is not None:
        history.append(str(champion.version))
    client.set_registered_model_alias(name, CHAMPION, str(version))
    _set_history(client, name, history)
    return None if champion is None else str(champion.version)


def _history(client, name: str) -> list[str]:
    tags = registered_model(client, name).tags
    return list(json.loads(tags.get(HISTORY_TAG, "[]")))


def registered_model(client, name: str):
    """The registered model `name`.

    Raises:
        UserError: no model of that name in this registry.
    """
    from mlflow.exceptions import MlflowException

    from data.errors import UserError

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(
            f"No registered model named {name!r} in this registry: check the name (the pipeline's `name`; "
            "`mlflow ui` lists them) and --workdir."
        ) from None


def _set_history(client, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    if history:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, history[-1])
    elif PREVIOUS_CHAMPION in client.get_registered_model(name).aliases:
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)


@dataclass(frozen=True)
class VersionRow:
    """One registered version as `lowregret models` lists it (None: the tag is not there)."""

    name: str
    version: str
    aliases: tuple[str, ...]
    eval_loss: float | None
    regret: float | None
    regret_ci: tuple[float, float] | None
    verdict: str | None
    rolled_back: bool
    created_ms: int


def list_versions(client, name: str | None = None) -> list[VersionRow]:
    """Every version of every registered model (or of `name`), by model name then version.

    Raises:
        UserError: `name` is not a registered model (the message lists those that are).
    """
    from data.errors import UserError

    models = _all_registered_models(client)
    if name is not None:
        if name not in {m.name for m in models}:
            known = ", ".join(sorted(m.name for m in models)) or "none yet"
            raise UserError(f"No registered model named {name!r} (registered: {known}).")
        models = [m for m in models if m.name == name]
    rows = []
    for model in sorted(models, key=lambda m: m.name):
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        versions = client.search_model_versions(f"name='{model.name}'")
        for v in sorted(versions, key=lambda v: int(v.version)):
            tags = v.tags or {}
            ci = [_number(tags.get(t)) for t in REGRET_CI_TAGS]
            rows.append(VersionRow(
                name=model.name, version=str(v.version), aliases=tuple(sorted(aliases.get(str(v.version), []))),
                eval_loss=_number(tags.get(EVAL_LOSS_TAG)), regret=_number(tags.get(REGRET_TAG)),
                regret_ci=None if None in ci else (ci[0], ci[1]), verdict=tags.get(VERDICT_TAG) or None,
                rolled_back="rolled_back" in tags, created_ms=int(v.creation_timestamp or 0)))
    return rows


def _all_registered_models(client) -> list:
    models, token = [], None
    while True:
        page = client.search_registered_models(page_token=token)
        models += list(page)
        token = page.token
        if not token:
            return models


def _number(value) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except ValueError:
        return None
