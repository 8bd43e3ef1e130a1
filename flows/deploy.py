"""Schedules: the pipeline as a Prefect deployment on a cron schedule.

Two ways, both Prefect's own (no home-made scheduler):
- served: `pipeline.serve(...)` registers the deployment and runs its flow runs from this process
  until it is stopped (a laptop, a VM, a container that stays up);
- a work pool: `pipeline.from_source(<project dir>, entrypoint).to_deployment(...).apply()`
  registers it with a work pool; a worker of that pool (`prefect worker start --pool NAME`) runs
  each flow run.
"""

from __future__ import annotations

from pathlib import Path

from flows.config import PipelineConfig

ENTRYPOINT = "flows/pipeline.py:pipeline"
PROJECT_DIR = Path(__file__).resolve().parent.parent


def deployment_parameters(config: PipelineConfig, workdir: str | None) -> dict:
    """The flow parameters a scheduled run gets: the config as plain JSON and the working folder."""
    return {"config": config.to_dict(), "workdir": str(Path(workdir).resolve()) if workdir else None}


def serve_pipeline(config: PipelineConfig, cron: str, name: str, workdir: str | None = None) -> None:
    """Register the deployment and serve its runs from this process (blocks until interrupted)."""
    from flows.pipeline import pipeline

    pipeline.serve(name=name, cron=cron, parameters=deployment_parameters(config, workdir),
                   tags=["lowregret"], description=f"LoRA-vs-FullFT pipeline for {config.name}")


def deploy_to_work_pool(config: PipelineConfig, cron: str, name: str, work_pool: str,
                        workdir: str | None = None) -> str:
    """Register the deployment with `work_pool`, code pulled from this project folder; returns its id."""
    from flows.pipeline import pipeline

    flow = pipeline.from_source(source=str(PROJECT_DIR), entrypoint=ENTRYPOINT)
    gpus = training_gpus(config)
    # to_deployment + apply: registration only. flow.deploy() also lists the pool's online workers
    # with offset/limit null, which Prefect 3.8.8's server rejects (422) on FastAPI >= 0.151.
    deployment = flow.to_deployment(name=name, cron=cron, parameters=deployment_parameters(config, workdir),
                                    work_pool_name=work_pool, tags=["lowregret"],
                                    description=f"LoRA-vs-FullFT pipeline for {config.name}",
                                    job_variables={"gpu_count": gpus} if gpus > 1 else None)
    return str(deployment.apply(work_pool_name=work_pool))


def training_gpus(config: PipelineConfig) -> int:
    """GPUs a flow run of `config` trains on: the most processes either run launches (train.launch,
    `processes: auto` resolved from the plan). A work pool deployment asks its job for that many
    (the Kubernetes template's `gpu_count`), so the pod holds as many GPUs as the launcher starts ranks."""
    return max(config.train_config(method).launch.processes for method in ("full", "lora"))
