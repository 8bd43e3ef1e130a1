"""One run lifecycle for the supervised and the RL loop: preflight, the partial folder, the resume
check, the optimizer, the evaluation and checkpoint cadence, throughput and MFU, and finalize.

A run writes nothing until its setup has succeeded; then everything goes to `<output_dir>.partial/`,
renamed to `output_dir` once complete (`finalize`), so a killed run never looks finished. The loops
(trainer/loop.py, trainer/rl.py) hold only what differs: their data, their step and their files.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from data.errors import UserError
from data.paths import check_output_dir
from trainer import checkpoint as ckpt


def run_dirs(config) -> tuple[Path, Path]:
    """(output_dir, its `.partial` sibling where the run writes until it is complete)."""
    final = Path(config.output_dir)
    return final, final.with_name(final.name + ".partial")


def finished_result(config, result_class, log=print):
    """The result (`result_class.from_dict` of its summary.json) of the finished run this command retries
    (`finished_summary`), said in one line; None when it is not a retry of a finished run."""
    summary = finished_summary(config)
    if summary is None:
        return None
    log(f"{config.output_dir} is this run, already finished: nothing to do (resume=auto).")
    return result_class.from_dict(summary)


def finished_summary(config) -> dict | None:
    """The summary.json of the finished run at output_dir when this command is a retry of it: resume=auto
    (what a retry loop passes) and the same options (resume and overwrite aside). The data is not
    re-read: the run is the one this config names. A retry of a run that finished just before its
    process was killed is then done (exit 0), not refused as "already exists"."""
    final, _ = run_dirs(config)
    if config.resume != "auto" or config.overwrite or not (final / "summary.json").is_file():
        return None
    from data.guard import read_json

    summary = read_json(final / "summary.json", "remove the folder or choose another output_dir.")
    ignore = {"resume", "overwrite"}
    recorded = summary.get("config") if isinstance(summary, dict) else None
    if not isinstance(recorded, dict):
        return None
    mine = {k: v for k, v in json.loads(json.dumps(config.to_dict())).items() if k not in ignore}
    return summary if {k: v for k, v in recorded.items() if k not in ignore} == mine else None


def preflight_dirs(config) -> Path | None:
    """Check the output and resume paths before any work; return the checkpoint to resume, if any.

    Raises:
        UserError: output_dir cannot be created (under a file, read-only), a finished run would be
            overwritten, a killed run's output would be lost, or the resume path holds no checkpoint.
    """
    final, partial = run_dirs(config)
    check_output_dir(final, "output_dir")
    if final.exists() and not config.overwrite:
        raise UserError(
            f"{final} already exists (a finished run or another folder). Choose another output_dir, "
            "or set overwrite=true to replace it."
        )
    if config.resume is None:
        if ckpt.list_checkpoints(partial) and not config.overwrite:
            raise UserError(
                f"{partial} holds checkpoints of an unfinished run. Continue it with resume=auto, "
                "or set overwrite=true to start over."
            )
        return None
    if config.resume == "auto":
        return ckpt.find_checkpoint(partial)
    found = ckpt.find_checkpoint(config.resume)
    if found is None:
        raise UserError(f"resume={config.resume!r} holds no checkpoint (checkpoints/step-N/state.json).")
    return found


def open_run_dir(config, run_dir: Path, resuming: bool) -> None:
    """From here on the run writes: a fresh (or resumed) partial folder holding config.json. Main process only."""
    if not resuming and run_dir.exists():
        shutil.rmtree(run_dir)  # a stale partial run: allowed by overwrite=true or empty of checkpoints
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))


def finalize(run_dir: Path, final_dir: Path) -> None:
    """Rename the complete partial folder to output_dir (replacing it only under overwrite=true,
    which preflight checked). Main process only."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(run_dir, final_dir)


def build_optimizer(model, config, use_cuda: bool) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused kernel on CUDA (one launch, no foreach copies)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay, fused=True if use_cuda else None,
    )


def eval_steps(max_steps: int, points: int) -> list[int]:
    """`points` evaluation steps (all of 0..max_steps when there are fewer): 0 (the base model),
    max_steps, and between them steps as close to log-spaced from 1 as distinct integers allow."""
    count = min(points, max_steps + 1)
    targets = np.geomspace(1, max_steps, num=count - 1) if count > 2 else [max_steps] * (count - 1)
    steps = [0]
    for k, target in enumerate(targets):
        # Round, but stay above the previous step and leave room for the ones still to come.
        steps.append(min(max(int(round(target)), steps[-1] + 1), max_steps - (len(targets) - 1 - k)))
    return steps


def check_finite(what: str, value: float, step: int, config) -> None:
    """Stop a run whose loss is not a finite number (inf or nan), which no later step repairs: a run that
    "finishes" with a nan loss would exit 0 and could be registered.

    Raises:
        UserError: naming the step and the likely cause (step 0: the model itself).
    """
    if math.isfinite(value):
        return
    cause = ("the base model's own weights or outputs are not finite: check the model files"
             if step == 0 else f"training diverged: lower lr (now {config.lr:g}) or alpha (now {config.alpha:g}), "
             "or clip gradients (max_grad_norm=1.0)")
    raise UserError(f"The {what} is {value} at step {step}: {cause}. The run stopped; nothing was finished or "
                    f"registered, and its partial folder {config.output_dir}.partial keeps the checkpoints from "
                    "before (resume=auto after a fix, or overwrite=true).")


def checkpoint_due(config, step: int, max_steps: int) -> bool:
    """Whether a checkpoint follows optimizer step `step` (1-based): every checkpoint_every steps,
    never after the last one (the finished run is saved instead)."""
    return bool(config.checkpoint_every) and step % config.checkpoint_every == 0 and step < max_steps


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The run's peak memory and how it was measured: CUDA's allocator peak, else the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process_max_rss"


class Throughput:
    """Tokens per second of the training steps and what they achieve in model FLOPs, as nanoGPT's
    `estimate_mfu`: MFU = (tokens/s x the planner's training FLOPs per token) / (peak FLOP/s per
    device x devices). The FLOPs per token are planner.flops' (6 per weight for FullFT, 4 per frozen
    weight plus the adapter's for LoRA, plus attention scores) at the run's mean sequence length, so
    the MFU that the planner assumes for its time estimates can be checked against what runs reach.
    The peak is the datasheet dense bf16 peak of a GPU in planner.gpus; a CPU (or an unknown GPU) has
    none, and the MFU is then None while model_flops_per_s is still reported."""

    def __init__(self, config, seq_len: float, device: torch.device, world_size: int):
        self.flops_per_token, self.peak_flops, self.note = _model_flops(config, seq_len, device)
        self.world_size = world_size
        self.tokens, self.seconds = 0, 0.0

    def add(self, tokens: int, seconds: float) -> dict[str, float]:
        """Count one step; return its running `tokens_per_s` and, where known, `model_flops_per_s` and `mfu`."""
        self.tokens += tokens
        self.seconds += seconds
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        if not self.seconds:
            return {"tokens_per_s": 0.0}
        tokens_per_s = self.tokens / self.seconds
        metrics = {"tokens_per_s": tokens_per_s}
        if self.flops_per_token is not None:
            metrics["model_flops_per_s"] = tokens_per_s * self.flops_per_token
            if self.peak_flops:
                metrics["mfu"] = metrics["model_flops_per_s"] / (self.peak_flops * self.world_size)
        return metrics

    def summary(self) -> dict:
        """The run's figures for summary.json, with the planner's assumed MFU beside the one reached."""
        from planner.flops import DEFAULT_MFU

        metrics = self.metrics()
        return {"flops_per_token": self.flops_per_token, "model_flops_per_s": metrics.get("model_flops_per_s"),
                "mfu": metrics.get("mfu"), "planner_assumed_mfu": DEFAULT_MFU, "mfu_note": self.note}


def _model_flops(config, seq_len: float, device: torch.device) -> tuple[float | None, float | None, str]:
    """(training FLOPs per token, the device's peak FLOP/s, a note) for `config`'s model and method."""
    from planner.flops import estimate_flops
    from planner.gpus import device_gpu
    from planner.lora import count_lora_params
    from planner.shapes import load_shape

    try:
        shape = load_shape(config.model)
        lora = count_lora_params(shape, config.rank, config.targets, config.expert_rank_divisor,
                                 config.target_unembedding)
    except UserError as exc:
        return None, None, f"no FLOPs: the planner cannot shape {config.model} ({exc})"
    flops = estimate_flops(shape, lora, max(1, round(seq_len)))
    per_token = flops.fullft_flops_per_token if config.method == "full" else flops.lora_flops_per_token
    if device.type != "cuda":
        return per_token, None, f"no MFU on {device.type}: planner.gpus has peaks for GPUs only"
    name = torch.cuda.get_device_name(device)
    gpu = device_gpu(name)
    if gpu is None:
        return per_token, None, f"no MFU: {name!r} is not in planner.gpus"
    return per_token, gpu.peak_bf16_flops, f"peak {gpu.peak_bf16_flops:.4g} FLOP/s per {gpu.name} (bf16 dense)"


def versions() -> dict:
    """The library versions that computed the run's numbers (summary.json)."""
    import accelerate
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "python": sys.version.split()[0]}
