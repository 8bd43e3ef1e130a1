"""Several processes training one run: FSDP2 sharding driven by the trainer, and its sharded checkpoints.

The loop runs under torchrun (`trainer.launch` starts it). DDP goes through accelerate's `prepare`;
FSDP2 does not, because `accelerate launch` with `distributed_type: FSDP` on CPU silently runs DDP
(accelerate 1.15: `Accelerator(cpu=True)` is MULTI_CPU and `prepare` returns a
DistributedDataParallel; DESIGN.md, "Many processes on CPU"). So the trainer calls torch's
`fully_shard` itself, on every decoder layer (the model's `_no_split_modules`) and then on the
whole model: one code path on CPU (gloo) and GPU (NCCL), and the tests exercise the sharding that
a GPU run uses.

Sharded checkpoints are torch.distributed.checkpoint (DCP) with its safetensors storage
(`HuggingFaceStorageWriter(save_distributed=True)`): every rank writes its own shards of the trainable
weights and AdamW state as a safetensors file whose offsets are JSON metadata. Nothing read back can
run code (DCP's default FileSystemReader unpickles its `.metadata` file, so it is not used), and DCP
reads the shards into whatever sharding the loading model has.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from data.errors import UserError

SHARDS_DIR = "shards"  # inside a checkpoint folder: every rank's safetensors file


def choose_sharding(requested: str, method: str, world_size: int) -> str:
    """"single", "ddp" or "fsdp": what a run of `method` does with `world_size` processes.

    "auto" shards FullFT (its weights, gradients and AdamW state are what outgrow one device: 16 bytes
    per parameter) and replicates LoRA (a frozen base plus a small adapter; the planner's hardware fit
    says when a LoRA base needs sharding, and `trainer.launch.resolve_launch` passes "fsdp" then).
    (`LaunchConfig` refuses fsdp or ddp for a single process.)
    """
    if world_size == 1:
        return "single"
    if requested != "auto":
        return requested
    return "fsdp" if method == "full" else "ddp"


def make_accelerator(mixed_precision: str, use_cuda: bool):
    """The run's `accelerate.Accelerator`: one process, or this rank of a torchrun launch (over gloo
    when there is no CUDA: `cpu=True`). Both loops start here.

    Raises:
        UserError: an accelerate FSDP config is active (`accelerate launch --use_fsdp`, a config file):
            the trainer shards with FSDP2 itself.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not use_cuda)
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError(
            "accelerate's FSDP plugin is not used: the trainer shards with FSDP2 itself (on CPU the plugin "
            "silently runs DDP). Train on several processes with `launch.processes=N` (FSDP2 for FullFT; "
            "launch.sharding=fsdp for LoRA), not an accelerate FSDP config."
        )
    return accelerator


def gathered_counts(accelerator, *values: int) -> torch.Tensor:
    """Each rank's integer `values` as a [processes, len(values)] tensor, in rank order (a collective)."""
    return accelerator.gather(torch.tensor([values], dtype=torch.long, device=accelerator.device))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, the FSDP units: modules whose class is in transformers'
    `_no_split_modules` (LlamaDecoderLayer, Qwen3MoeDecoderLayer, ...).

    Raises:
        UserError: the model names no such blocks, or none are found.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(
            f"{type(base).__name__} names no decoder-layer class (_no_split_modules) to shard with FSDP: "
            "use launch.sharding=ddp for this model."
        )
    return layers


def device_mesh(device: torch.device, world_size: int):
    """The 1-D mesh of the run's ranks (made outside any FakeTensorMode: it reads its rank map)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


def shard_model(model: nn.Module, mesh, mixed_precision: str) -> int:
    """Apply FSDP2 in place: each decoder layer, then the whole model (embedding, norm, head).

    Every rank holds the same full model when this runs (same seed, same weights), so each keeps its
    slice of identical tensors. Under bf16 the layers compute in bf16 and reduce gradients in fp32
    (FSDP2's MixedPrecisionPolicy; it replaces accelerate's autocast on this path).

    Returns:
        the number of decoder layers sharded.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return len(layers)


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are DTensors (FSDP2 sharded them), the proof a run is not DDP."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sharding: str, accelerator, enabled: bool):
    """Accumulate without communicating on all but a step's last micro-batch: DDP's `no_sync`
    (through accelerate) or FSDP2's `set_requires_gradient_sync(False)` (gradients stay unsharded
    until the last micro-batch reduce-scatters them)."""
    if enabled:
        yield
    elif sharding == "fsdp":
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


def full_state_dict(model: nn.Module) -> dict:
    """The model's full (unsharded) state dict on CPU, on the main process (empty elsewhere): a
    collective, every rank calls it. For saving the finished adapter or model in its usual format, so
    a tied weight (an unembedding that is the embedding) appears once, under its first name, as in
    the state dict transformers saves itself."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
    return {k: v for k, v in state.items() if k not in tied}


def _trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The tensors a sharded checkpoint holds, by name: each trainable parameter (its DTensor) and
    its AdamW state (exp_avg, exp_avg_sq as DTensors; the step count, the same on every rank)."""
    state = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        state[f"model.{name}"] = param
        for key, value in optimizer.state.get(param, {}).items():
            state[f"optim.{name}.{key}"] = value
    return state


def _init_adam_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter the AdamW state a step would create, for DCP to load into in place
    (zeros with the parameter's sharding; a float32 step count as `torch.optim.AdamW` keeps it)."""
    for param in model.parameters():
        if param.requires_grad and param not in optimizer.state:
            optimizer.state[param] = {"step": torch.zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the trainable weights and AdamW state under `folder` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(_trainable_state(model, optimizer),
             storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read the shards under `folder` into the model's parameters and AdamW state in place (a
    collective). DCP maps the saved offsets onto this run's sharding.

    Raises:
        UserError: the checkpoint holds other tensors than this run trains, or damaged files.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException

    _init_adam_state(model, optimizer)
    state = _trainable_state(model, optimizer)
    try:
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))
    except (CheckpointException, Exception) as exc:  # a BaseException: DCP gathers every rank's failure in it
        failures = getattr(exc, "failures", None) or {}
        first = failures[min(failures)] if failures else exc
        reason = str(first[0] if isinstance(first, tuple) else first).strip().splitlines()
        raise UserError(
            f"Cannot resume from {folder.parent}: its sharded weights and optimizer state do not load into this "
            f"run ({(reason[-1] if reason else type(exc).__name__)[:300]}). The checkpoint is damaged or was "
            "written by another run: resume from an earlier checkpoint, or start a fresh run (overwrite=true)."
        ) from exc
