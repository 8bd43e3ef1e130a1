"""One training loop for LoRA and FullFT: setup → train → save.

Runs as is on one CPU or GPU, and as every rank of a torchrun launch (`trainer.launch`): with DDP
accelerate places the model, wraps it for data parallelism, autocasts to bf16 on GPU and reduces
the logged numbers; with FSDP2 the loop shards the model itself (trainer/distributed.py says why).
Read it top to bottom; the helpers it calls are in data.py, model.py, loss.py (the completion NLL
and the micro-batch step), distributed.py and checkpoint.py.

Loss: nats per completion token. Each optimizer step's loss is the sum of the token losses of all
its micro-batches on all processes divided by the step's completion-token count, which every
process knows in advance from the step's example indices. A micro-batch's backward therefore uses
loss_sum / step_tokens × processes (DDP averages gradients over processes), which makes the
gradient independent of how the step is split into micro-batches and processes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data.errors import UserError
from data.sources import load_tokenizer, loadable_path
from trainer import checkpoint as ckpt
from trainer import distributed
from trainer import lifecycle as life
from trainer.callbacks import TrainCallback
from trainer.config import TrainConfig
from trainer.data import collate, describe_data, example_id, micro_batches, prepare_data, step_indices
from trainer.loss import completion_nll, loss_head, train_micro_batch
from trainer.model import base_dtype, count_trainable, load_for_training, save_trained
from trainer.result import EVAL_SCORES_FILE, SUPERVISED, TrainResult, scores_record


def lr_lambda(config: TrainConfig, max_steps: int | None = None):
    """Multiplier of the peak LR at a step: linear warm-up, then constant or cosine to 0 at
    `max_steps` (default config.max_steps; a num_epochs run passes its total_steps)."""
    max_steps = config.max_steps if max_steps is None else max_steps

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass(frozen=True)
class HeldOutNll:
    """The held-out loss (nats per completion token) and each example's summed NLL, in example order."""

    loss: float
    example_nll: list[float]


def _evaluate(model, seqs, batch_size, pad_id, accelerator, head) -> HeldOutNll:
    """Held-out loss and each example's NLL sum; examples sharded over processes.

    Every process fills its examples' slots of a zero vector and a sum-reduction assembles them, so
    every process ends with all examples, in order. Every process runs as many forwards (a process
    short of examples scores its first batch again and discards it): FSDP's all-gathers are
    collectives that all ranks must join.
    """
    model.eval()
    device = accelerator.device
    nll_n = torch.zeros(len(seqs), dtype=torch.float64, device=device)
    mine = list(range(accelerator.process_index, len(seqs), accelerator.num_processes))
    forwards = math.ceil(math.ceil(len(seqs) / accelerator.num_processes) / batch_size)
    with torch.no_grad():
        for k in range(forwards):
            rows = mine[k * batch_size : (k + 1) * batch_size]
            batch = rows or mine[:batch_size] or [0]
            nll = completion_nll(model, collate([seqs[j] for j in batch], pad_id, packed=False).to(device), head=head)
            if rows:
                nll_n[torch.tensor(rows, device=device)] = nll.example_nll_B
    model.train()
    nll_n = accelerator.reduce(nll_n, reduction="sum")
    return HeldOutNll(nll_n.sum().item() / sum(s.loss_tokens for s in seqs), nll_n.tolist())


def precision(config: TrainConfig, use_cuda: bool) -> tuple[str, str]:
    """(mixed_precision, base_dtype) of a run: on CUDA bf16 autocast and, for LoRA, a bf16 frozen base;
    on CPU fp32 throughout (CPU bf16 kernels are slow). Explicit config values win."""
    mixed_precision = {"auto": "bf16" if use_cuda else "no"}.get(config.mixed_precision, config.mixed_precision)
    return mixed_precision, base_dtype(config, use_cuda)


def train(config: TrainConfig, progress: bool = True, callbacks: Sequence[TrainCallback] = ()) -> TrainResult:
    """Train `config.method` on `config.dataset`; write adapter/ or model/, curves.json, summary.json
    and eval_scores.json (per-example held-out NLL, `trainer.result.EVAL_SCORES_FILE`).

    `callbacks` (main process only) see the run start, each step's metrics and the result: how
    `lowregret train` logs to MLflow (flows.training_log) without the trainer importing it.

    Raises:
        UserError: bad input (data, targets, rank, output/resume paths), always before the first step
            and before anything is written.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    finished = life.finished_result(config, TrainResult, functools.partial(print, flush=True))
    if finished is not None:
        return finished
    # ---- setup: checks, data, model (nothing written until all of it succeeded) ----------------
    resume_from = life.preflight_dirs(config)
    final_dir, run_dir = life.run_dirs(config)
    use_cuda = torch.cuda.is_available()
    mixed_precision, _ = precision(config, use_cuda)
    accelerator = distributed.make_accelerator(mixed_precision, use_cuda)
    sharding = distributed.choose_sharding(config.launch.sharding, config.method, accelerator.num_processes)
    set_seed(config.seed)
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()  # peak of this run, not of earlier work in the process
    hf_logging.disable_progress_bar()  # weight loading/saving bars would interleave with ours

    def say(message: str) -> None:  # main process only; tqdm.write keeps the progress bar intact
        if accelerator.is_main_process:
            tqdm.write(message)

    def notify(event: str, *args) -> None:  # callbacks run on the main process only
        if accelerator.is_main_process:
            for callback in callbacks:
                getattr(callback, event)(*args)

    say(f"processes: {accelerator.num_processes}, sharding: {sharding}")
    # One process converts a GGUF base and tokenizes into the caches, then the others read them.
    with accelerator.main_process_first():
        loadable_path(config.model)
        tokenizer = load_tokenizer(config.model)
        data = prepare_data(config, tokenizer)
    say(describe_data(data, config))
    global_batch = config.batch_size * config.grad_accum_steps * accelerator.num_processes
    max_steps = config.total_steps(len(data.train), global_batch)
    if config.num_epochs is not None:
        say(f"num_epochs={config.num_epochs:g}: {max_steps} steps of {global_batch} "
            f"({len(data.train)} training rows)")
    if len(data.train) < global_batch:
        say(f"note: {len(data.train)} training rows < global batch {global_batch}: examples repeat within a step")
    config_hash = config.hash(data.fingerprint)

    model, what = load_for_training(config, use_cuda, context_tokens=config.max_length)
    trainable_params = count_trainable(model)
    say(f"trainable parameters: {trainable_params:,} ({what})")

    resume_state = None
    if resume_from is not None:
        resume_state = ckpt.read_state(resume_from)
        ckpt.check_resumable(resume_from, resume_state, config_hash, global_batch, accelerator.num_processes,
                             sharding)
        ckpt.check_state(resume_from, resume_state, max_steps, "train")

    if sharding == "fsdp":
        model.to(accelerator.device)
        layers = distributed.shard_model(
            model, distributed.device_mesh(accelerator.device, accelerator.num_processes), mixed_precision)
        say(f"FSDP2: {layers} decoder layers and the model sharded over {accelerator.num_processes} processes")
    optimizer = life.build_optimizer(model, config, use_cuda)  # under FSDP2: over the sharded (DTensor) parameters
    if sharding != "fsdp":
        model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: accelerate would step it once per process; our schedule counts optimizer steps.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, max_steps))
    unwrapped = model if sharding == "fsdp" else accelerator.unwrap_model(model)
    # The chunked completion loss wherever it is exact (trainer/loss.py), else full logits.
    head, full_logits_reason = loss_head(unwrapped, sharded=sharding == "fsdp")
    loss_path = "chunked" if head is not None else f"full logits: {full_logits_reason}"
    say(f"loss: {loss_path}")

    curves: dict[str, list] = {"train": [], "eval": []}
    eval_nll: list = []  # [step, per-example held-out NLL sums] at each eval step
    start_step, tokens_total = 0, 0
    if resume_state is not None:
        ckpt.load_checkpoint(resume_from, unwrapped, optimizer, scheduler, sharded=sharding == "fsdp")
        start_step, tokens_total = resume_state["step"], resume_state["tokens"]
        curves, eval_nll = resume_state["curves"], resume_state["eval_nll"]
        say(f"resumed from {resume_from} at step {start_step}")

    # ---- from here on we write: the partial run directory, renamed to output_dir at the end -----
    if accelerator.is_main_process:
        life.open_run_dir(config, run_dir, resuming=resume_state is not None)
    accelerator.wait_for_everyone()
    notify("on_start", config, {"output_dir": str(final_dir), "steps": max_steps, "global_batch": global_batch,
                                "processes": accelerator.num_processes, "trainable_params": trainable_params,
                                "config_hash": config_hash, "data": data.stats})

    # ---- train --------------------------------------------------------------------------------
    pad_id = tokenizer.pad_token_id
    evals_at = set(life.eval_steps(max_steps, config.eval_points))

    def evaluate(at_step: int) -> None:
        held_out = _evaluate(model, data.eval, config.batch_size, pad_id, accelerator, head)
        life.check_finite("held-out loss", held_out.loss, at_step, config)
        curves["eval"].append([at_step, held_out.loss])
        eval_nll.append([at_step, held_out.example_nll])

    if start_step == 0:
        try:
            evaluate(0)
        except UserError:  # the base model's own loss is not finite: the fresh partial folder goes too
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        say(f"step 0: eval loss {curves['eval'][-1][1]:.4f} (base model)")
        notify("on_step", 0, {"eval_loss": curves["eval"][-1][1]})
    model.train()
    mean_length = sum(len(s.input_ids) for s in data.train) / len(data.train)
    throughput = life.Throughput(config, mean_length, accelerator.device, accelerator.num_processes)
    bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps,
               disable=not (progress and accelerator.is_main_process), desc=f"train {config.method}")
    for step in bar:
        t0 = time.perf_counter()
        indices = step_indices(len(data.train), step, global_batch, config.seed)
        loss_tokens = sum(data.train[i].loss_tokens for i in indices)
        mine = micro_batches(indices, config.batch_size, accelerator.num_processes, accelerator.process_index)
        nll_step = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        input_tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for k, batch in enumerate(mine):
            micro = collate([data.train[i] for i in batch], pad_id, packed=config.packing).to(accelerator.device)
            # Gradients are all-reduced (FSDP: reduce-scattered) only on the last micro-batch of the step.
            with distributed.gradient_sync(model, sharding, accelerator, enabled=k == len(mine) - 1):
                nll = train_micro_batch(model, micro, accelerator.num_processes / loss_tokens, head=head,
                                        backward=accelerator.backward)
            nll_step += nll.nll_sum.double()
            input_tokens += sum(len(data.train[i].input_ids) for i in batch)
        if config.max_grad_norm is not None and sharding == "fsdp":  # the norm of DTensor gradients is global
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        elif config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        nll_step, input_tokens = accelerator.reduce(torch.stack([nll_step, input_tokens]), reduction="sum")
        train_loss = nll_step.item() / loss_tokens
        life.check_finite("training loss", train_loss, step + 1, config)
        speed = throughput.add(int(input_tokens.item()), time.perf_counter() - t0)
        tokens_total += int(input_tokens.item())
        curves["train"].append([step + 1, train_loss])
        bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{speed['tokens_per_s']:,.0f}")
        notify("on_step", step + 1, {"train_loss": train_loss, "lr": scheduler.get_last_lr()[0], **speed})
        if step + 1 in evals_at:
            evaluate(step + 1)
            say(f"step {step + 1}: train loss {train_loss:.4f}, eval loss {curves['eval'][-1][1]:.4f}")
            notify("on_step", step + 1, {"eval_loss": curves["eval"][-1][1]})
        if life.checkpoint_due(config, step + 1, max_steps):
            state = {"config_hash": config_hash, "global_batch": global_batch, "tokens": tokens_total,
                     "examples_seen": (step + 1) * global_batch, "curves": curves, "eval_nll": eval_nll,
                     "processes": accelerator.num_processes, "sharding": sharding}
            if sharding == "fsdp" or accelerator.is_main_process:  # under FSDP2 every rank writes its shards
                ckpt.save_checkpoint(run_dir, step + 1, unwrapped, optimizer, scheduler, state,
                                     keep=config.keep_checkpoints, sharded=sharding == "fsdp",
                                     is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone)
            accelerator.wait_for_everyone()
    bar.close()

    # ---- save ---------------------------------------------------------------------------------
    wall_s = time.perf_counter() - started
    peak_bytes, peak_kind = life.peak_memory(accelerator.device)
    sub = "adapter" if config.method == "lora" else "model"
    held_out_ids = [example_id(s) for s in data.eval]
    result = TrainResult(
        method=config.method,
        output_dir=str(final_dir),
        model_dir=str(final_dir / sub),
        curves_path=str(final_dir / "curves.json"),
        summary_path=str(final_dir / "summary.json"),
        scores_path=str(final_dir / EVAL_SCORES_FILE),
        final_train_loss=curves["train"][-1][1],
        final_eval_loss=curves["eval"][-1][1],
        steps=max_steps,
        tokens=tokens_total,
        wall_s=round(wall_s, 3),
        tokens_per_s=round(throughput.metrics()["tokens_per_s"], 1),
        peak_memory_bytes=int(peak_bytes),
        trainable_params=trainable_params,
        config_hash=config_hash,
        peak_memory_kind=peak_kind,
    )
    # Gathers FSDP shards (a collective: every process calls it); peft keeps only the adapter's keys.
    state_dict = distributed.full_state_dict(model) if sharding == "fsdp" else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_trained(unwrapped, tokenizer, run_dir / sub, method=config.method, base_ref=config.model,
                     state_dict=state_dict)
        (run_dir / "curves.json").write_text(json.dumps(curves, indent=1))
        (run_dir / EVAL_SCORES_FILE).write_text(json.dumps(
            scores_record(SUPERVISED, held_out_ids, [s.loss_tokens for s in data.eval], eval_nll)))
        summary = {
            **result.to_dict(),
            "config": config.to_dict(),
            "data": data.stats,
            "data_fingerprint": data.fingerprint,
            "heldout_fingerprint": hashlib.sha256(" ".join(held_out_ids).encode()).hexdigest()[:16],
            "resumed_from_step": start_step or None,
            "processes": accelerator.num_processes,
            "sharding": sharding,
            "sharded_parameters": distributed.is_sharded(model),
            "global_batch": global_batch,
            "device": str(accelerator.device),
            "mixed_precision": mixed_precision,
            "loss_path": loss_path,
            "throughput": throughput.summary(),
            "versions": life.versions(),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        life.finalize(run_dir, final_dir)
    accelerator.wait_for_everyone()
    notify("on_end", result)
    say(
        f"done: {result.steps} steps, {result.tokens:,} tokens, {result.tokens_per_s:,.0f} tokens/s, "
        f"{result.wall_s:.1f} s, peak memory {result.peak_memory_bytes / 2**30:.2f} GiB ({peak_kind}); "
        f"final train loss {result.final_train_loss:.4f}, eval loss {result.final_eval_loss:.4f} → {final_dir}"
    )
    return result
