"""Prefect tasks: short wrappers over planner, trainer, evaluation and the MLflow registry.

Only the I/O tasks (MLflow tracking and registry writes) retry; training and evaluation are
deterministic and would fail the same way twice. The tasks serve both pipelines, supervised
(`TrainConfig`) and RL (`RLConfig`). The FullFT baseline is cached: its key is the base model + its
hyper-parameters + the dataset fingerprint (`TrainConfig.hash` / `RLConfig.hash`) + the code
version (`code_version`: every first-party source file a training run can execute, and the
versions of the libraries that compute its numbers), and its result is persisted (as JSON), so a
scheduled re-run in a new process reuses it. `refresh_baseline` bypasses the cache. The cache
transaction is SERIALIZABLE (`serializable_cache`): a second pipeline that needs the baseline while
the first trains it waits for it and then reads it from the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import shutil
from pathlib import Path

from prefect import task

IO_RETRIES = {"retries": 3, "retry_delay_seconds": 2}


# ------------------------------------------------------------------------------------ keys


# First-party packages; a training run's numbers depend on the files of these it can execute.
FIRST_PARTY = ("data", "planner", "trainer", "evaluation", "flows", "serving")
# Libraries whose versions change a run's numbers (kernels, model code, adapters, data loading).
NUMERIC_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets")


def training_sources(root: Path) -> list[Path]:
    """Every first-party source file a training run can execute, relative to the checkout `root`.

    Starts from trainer/*.py and follows each `import` and `from ... import` of a first-party
    module, at module level or inside functions (the data code imports data.dataset lazily),
    plus the `__init__.py` of every package on the way. Read with `ast`: nothing is imported.
    """
    import ast

    todo, seen = sorted((root / "trainer").glob("*.py")), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] not in FIRST_PARTY:
                    continue
                candidates = [root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")]
                candidates += [root.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts))]
                todo += [c for c in candidates if c.is_file() and c not in seen]
    return sorted(seen)


@functools.cache
def code_version(root: Path | None = None) -> str:
    """`<lowregret version>+<12 hex>`: a hash of `training_sources` (path and content) and of the
    NUMERIC_LIBRARIES' versions, so any change that can move a run's numbers invalidates the cache."""
    from importlib.metadata import PackageNotFoundError, version

    import trainer

    root = root or Path(trainer.__file__).resolve().parent.parent
    try:
        package = version("lowregret")
    except PackageNotFoundError:
        package = "0+unknown"
    digest = hashlib.sha256()
    for path in training_sources(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    for library in NUMERIC_LIBRARIES:
        try:
            digest.update(f"{library}=={version(library)}".encode())
        except PackageNotFoundError:
            digest.update(f"{library} absent".encode())
    return f"{package}+{digest.hexdigest()[:12]}"


def run_key(train_config, data_fingerprint: str, code: str) -> str:
    """16 hex chars naming one training run: what is trained, on which data, by which code."""
    payload = f"{train_config.hash(data_fingerprint)}|{code}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _baseline_cache_key(context, parameters) -> str:
    return "fullft-" + run_key(parameters["train_config"], parameters["data_fingerprint"], parameters["code"])


def serializable_cache(cache_key_fn):
    """A Prefect cache policy keyed by `cache_key_fn` whose transaction is SERIALIZABLE: the first
    run of a key holds its lock (`flows.locks.ProcessLockManager`, beside the result records) until
    its result is committed; a concurrent run of the same key waits, then finds it cached."""
    from prefect.cache_policies import CachePolicy

    from flows.locks import ProcessLockManager

    return CachePolicy.from_cache_key_fn(cache_key_fn).configure(
        lock_manager=ProcessLockManager(), isolation_level="SERIALIZABLE")


# ------------------------------------------------------------------------ planner / inputs


@task
def check_inputs(config) -> dict:
    """`flows.preflight.check_inputs` as the flow's first step, so a scheduled run is checked too (the
    CLI has run it already, before starting Prefect)."""
    from data.dataset import describe_format
    from flows import preflight

    data = preflight.check_inputs(config)  # the token cache makes the second reading cheap
    print(f"data: {data['examples']:,} rows of {describe_format(data['format'])} from {config.dataset}", flush=True)
    return data


def pipeline_plan(config, lora):
    """The capacity plan (`planner.plan.CapacityPlan`) of a pipeline's LoRA run `lora` (its resolved
    TrainConfig): loads the model's tokenizer and profiles the data (reading them here, not in the
    config object); writes nothing but the token cache."""
    from data.sources import load_tokenizer
    from evaluation.nll import base_model_bits
    from planner.plan import build_plan
    from planner.profile import profile_dataset

    profile = profile_dataset(config.dataset, load_tokenizer(config.model), method=config.info_method,
                              model_ref=config.model, score_bits=base_model_bits(config.model), columns=lora.columns)
    return build_plan(config.model, config.rank, targets=lora.targets, expert_rank_divisor=lora.expert_rank_divisor,
                      target_unembedding=lora.target_unembedding, profile=profile, seq_len=lora.max_length,
                      packing=lora.packing, batch_size=lora.batch_size * lora.grad_accum_steps, gpu=config.gpu,
                      fullft_lr=config.full_lr, steps=lora.max_steps, epochs=lora.num_epochs or 1.0)


@task
def make_plan(config, lora, out_dir: str) -> dict:
    """Capacity plan of the LoRA run `lora`, written as a report; returns its summary, files, the
    advised LoRA LR and a warning when the configured one disagrees with it."""
    from planner.advice import lr_disagreement
    from planner.report import write_report
    from planner.report_text import summary_lines

    plan = pipeline_plan(config, lora)
    files = write_report(plan, out_dir)
    verdict = plan.capacity.verdict if plan.capacity else "no-dataset"
    return {"verdict": verdict, "adapter_params": plan.adapter_params, "summary": summary_lines(plan),
            "files": {name: str(path) for name, path in files.items()},
            "advised_lora_lr": plan.advice.lora_lr,
            "lr_warning": lr_disagreement(lora.lr, plan.advice)}


# --------------------------------------------------------------------------------- trainer


def _train(run_config):
    """`trainer.launch.run`: the run in this process, or its ranks under torchrun with their lines in the
    task's log."""
    from trainer.launch import run

    return run(run_config, log=task_log(), progress=True)


def task_log():
    """The current Prefect task's (or flow's) logger's info, or print outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger().info
    except MissingContextError:
        return functools.partial(print, flush=True)


@task(cache_policy=serializable_cache(_baseline_cache_key), persist_result=True, cache_expiration=None,
      result_serializer="json")
def train_baseline(train_config, data_fingerprint: str, code: str):
    """The FullFT baseline, supervised or RL (cached; see the module docstring)."""
    return _train(train_config)


@task
def train_adapter(train_config):
    """The LoRA run, supervised or RL."""
    return _train(train_config)


def keyed_run(config, method: str, runs: Path, data_fingerprint: str, code: str, **changes):
    """The run config of one of a pipeline's runs (`config.train_config(method, **changes)`), writing to
    `runs/<run_prefix><method>[-r<rank>]-<key>`, and the key (`run_key`). The config is resolved once
    (`launch.processes=auto` included) and the pipeline hands it to the plan and the run."""
    resolved = config.train_config(method, **changes)
    key = run_key(resolved, data_fingerprint, code)
    folder = runs / f"{config.run_prefix}{method}{'' if method == 'full' else f'-r{config.rank}'}-{key}"
    # overwrite: the folder is named by the run key, so what it holds is this very run's output.
    return dataclasses.replace(resolved, output_dir=str(folder), overwrite=True), key


def cached_baseline(full_config, fingerprint: str, code: str, refresh: bool):
    """Run (or reuse) the cached baseline; retrain if the cached run's files were deleted.

    Returns:
        (the TrainResult or RLResult, whether it came from the cache).
    """
    state = train_baseline.with_options(refresh_cache=refresh or None)(full_config, fingerprint, code,
                                                                       return_state=True)
    result, cached = state.result(), state.name == "Cached"
    if cached and not Path(result.summary_path).is_file():
        result = train_baseline.with_options(refresh_cache=True)(full_config, fingerprint, code)
        cached = False
    return result, cached


# ------------------------------------------------------------------------------ evaluation


@task
def compare_runs(lora_dirs: list[str], full_dirs: list[str], threshold: float, threshold_abs: float):
    """Regret of the LoRA runs against the baselines on the same held-out examples (seeds paired)."""
    from evaluation.compare import RegretThreshold
    from evaluation.compare import compare_runs as compare

    comparison, _, _ = compare(lora_dirs, full_dirs, threshold=RegretThreshold(threshold, threshold_abs))
    return comparison


@task
def plot_runs(runs: dict[str, tuple[str, str]], path: str, title: str, base_loss: float | None = None) -> str:
    """The learning-curves chart of several runs: label -> (curves.json path, method)."""
    from evaluation.curves import load_curves, plot_curves

    plot_curves({label: load_curves(p) for label, (p, _) in runs.items()}, path,
                methods={label: method for label, (_, method) in runs.items()}, title=title, base_loss=base_loss)
    return path


@task
def fit_sweep(results: list) -> object:
    """Fit the LR sweep (optimum per method and rank, LoRA/FullFT LR ratio)."""
    from evaluation.sweep import SweepPoint, fit_lr_sweep

    points = [SweepPoint(method=r.method, rank=rank, lr=lr, final_loss=r.final_eval_loss)
              for (rank, lr), r in results]
    return fit_lr_sweep(points)


# ---------------------------------------------------------------------------------- MLflow


@task(**IO_RETRIES)
def start_tracking(settings, experiment: str, run_name: str, params: dict,
                   parent_run_id: str | None = None, tags: dict | None = None) -> str:
    """Create an MLflow run in `experiment` (nested under `parent_run_id` when given) with params,
    tagged with its owner (flows.tracking)."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from flows.settings import ensure_experiment
    from flows.tracking import end_orphaned_runs, owner_tags
    from flows.training_log import log_params

    client = MlflowClient(settings.tracking_uri)
    experiment_id = ensure_experiment(experiment, settings)
    all_tags = dict(tags or {}) | owner_tags()
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    else:  # a new top-level run: first end the ones a killed process left RUNNING
        end_orphaned_runs(client, experiment_id)
    run = client.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    log_params(client, run.info.run_id, params)
    return run.info.run_id


@task(**IO_RETRIES)
def log_training(settings, run_id: str, result, extra_tags: dict | None = None) -> None:
    """Log a TrainResult or RLResult into its run: the curves with step=, the final metrics, its files."""
    from mlflow.tracking import MlflowClient

    from flows.training_log import log_result

    log_result(MlflowClient(settings.tracking_uri), run_id, result, curves=True, tags=extra_tags)


def track_training(settings, config, run_config, result, parent: str, data_fingerprint: str, tags: dict) -> str:
    """A nested MLflow run for one training run of a pipeline (`config`), named so pipelines and
    replicates tell apart: its params, curves, final numbers, files and dataset."""
    rank = f" r={run_config.rank}" if run_config.method == "lora" else ""
    name = f"{config.name} {config.run_prefix}{run_config.method}{rank} lr={run_config.lr:g} seed={run_config.seed}"
    run_id = start_tracking(settings, config.experiment, name, run_config.to_dict(), parent)
    log_training(settings, run_id, result, tags)
    log_dataset(settings, run_id, config.dataset, data_fingerprint)
    return run_id


def close_pipeline(settings, parent: str, reports: Path, config, code: str, fields: dict, registration, decision,
                   files: list[str], metrics: dict, tags: dict, verdict: str, message: str) -> dict:
    """End a pipeline run: its summary (name, config, code version, `fields`, registration, promotion,
    MLflow ids) to `reports/summary.json`, logged with `files`, `metrics` and `tags` into the parent run;
    the verdict on the Prefect flow run; the parent run closed. Returns the summary."""
    summary = {
        "name": config.name, "config": config.to_dict(), "code_version": code, **fields,
        "registration": None if registration is None else dataclasses.asdict(registration),
        "promotion": None if decision is None else dataclasses.asdict(decision),
        "mlflow": {"tracking_uri": settings.tracking_uri, "experiment": config.experiment, "parent_run_id": parent},
    }
    path = write_json(str(reports / "summary.json"), summary)
    log_files(settings, parent, [path, *files], metrics=metrics, tags=tags | {"verdict": verdict})
    record_verdict(verdict, message)
    end_tracking(settings, parent)
    return summary


@task(**IO_RETRIES)
def log_files(settings, run_id: str, paths: list[str], metrics: dict | None = None,
              tags: dict | None = None, artifact_path: str | None = None) -> None:
    """Log files, scalar metrics and tags into a run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    for key, value in (metrics or {}).items():
        if value is not None:
            client.log_metric(run_id, key, float(value))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))
    for path in paths:
        client.log_artifact(run_id, path, artifact_path)


@task(**IO_RETRIES)
def log_dataset(settings, run_id: str, source: str, fingerprint: str, context: str = "training") -> None:
    """Record the dataset as the run's input (`mlflow.log_input`'s entity): its reference as the name,
    the fingerprint of the rows read as the digest, and where it comes from as the source."""
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    from data.builtin_datasets import is_builtin

    if is_builtin(source):
        origin = CodeDatasetSource({"lowregret_builtin": source})
    elif Path(source).exists():
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local files
            warnings.simplefilter("ignore")
            origin = resolve_dataset_source(str(Path(source).resolve()))
    else:
        origin = HuggingFaceDatasetSource(path=source)
    dataset = MetaDataset(origin, name=source, digest=fingerprint)
    entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
    MlflowClient(settings.tracking_uri).log_inputs(run_id, datasets=[entity])


@task(**IO_RETRIES)
def record_verdict(verdict: str, message: str) -> None:
    """Put the gate's verdict on this Prefect flow run: a `verdict:<VERDICT>` tag and a Markdown artifact."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id is None:  # called outside a flow run (a unit test of the task): nothing to tag
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(flow_run.id, tags=sorted({*run.tags, f"verdict:{verdict}"}))
    create_markdown_artifact(markdown=f"**{verdict}**\n\n{message}", key="regret-verdict",
                             description="LoRA-vs-FullFT regret gate")


@task(**IO_RETRIES)
def end_tracking(settings, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(settings.tracking_uri).set_terminated(run_id, status)


@task(**IO_RETRIES)
def register_adapter(settings, run_id: str, adapter_dir: str, base_model: str, name: str,
                     fingerprint: str, tags: dict, scratch: str, description: str | None = None):
    """Verify, log as pyfunc and register the adapter (or find the version of this fingerprint)."""
    from flows import registry
    from flows.locks import registry_lock
    from flows.settings import configure_mlflow

    configure_mlflow(settings)
    client = registry.client_for(settings)
    with registry_lock(settings, name):  # find-or-register: one version per fingerprint
        existing = registry.find_version(client, name, fingerprint)
        if existing is not None:
            return registry.Registration(name=name, version=str(existing.version), created=False)
        try:
            model_uri = registry.log_adapter_model(run_id, adapter_dir, base_model, scratch)
        finally:  # base_model.json is logged (copied into the run's artifacts): the scratch folder goes
            shutil.rmtree(scratch, ignore_errors=True)
        return registry.register_adapter(client, name, model_uri, fingerprint, tags, description)


@task(**IO_RETRIES)
def promote_adapter(settings, registration, passed: bool, eval_loss: float | None = None,
                    eval_reward: float | None = None):
    """Move `champion` to the new version if it passed and does not lose to the champion (by eval
    loss, or by eval reward for RL)."""
    from flows import registry
    from flows.locks import registry_lock

    if not registration.created:
        return registry.PromotionDecision(registration.name, registration.version, False,
                                          "identical run already registered; aliases unchanged")
    with registry_lock(settings, registration.name):  # the champion read and moved as one step
        return registry.promote_if_better(registry.client_for(settings), registration.name, registration.version,
                                          passed=passed, eval_loss=eval_loss, eval_reward=eval_reward)


@task
def write_json(path: str, record: dict) -> str:
    """Write `record` to `path` atomically (a reader, or a concurrent pipeline, never sees half a file)."""
    from data.atomic import write_json as write

    write(path, record, indent=2, default=_jsonable)
    return path


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
