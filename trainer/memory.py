"""Peak memory of one training step, measured without a GPU (and without the weights).

`measure_step_memory` runs the trainer's own step on fake tensors: the precision policy
(`loop.precision`), the model preparation (`model.prepare_model`: peft LoRA, gradient
checkpointing), the optimizer (`lifecycle.build_optimizer`), accelerate's `prepare` (autocast and the
fp32 conversion of the model's outputs), the loop's loss path (`loss.loss_head`: chunked or full
logits) and micro-batch step (`loss.train_micro_batch`: forward, loss, backward), on a batch made
by the loop's `data.collate`. The tensors are `torch._subclasses.fake_tensor.FakeTensorMode` fakes
(shapes and dtypes, no data), so a step of an 8B model "runs" on a laptop in seconds; PyTorch's own
`torch.distributed._tools.mem_tracker.MemTracker` records every tensor the step allocates and frees
(rounded up to the CUDA caching allocator's 512-byte blocks) and splits the peak into weights,
gradients, optimizer state, activations (saved in the forward) and temporaries (made in the backward).

The precision policy is the trainer's on a GPU (bf16 autocast, a bf16 frozen LoRA base), whatever
`device` the fakes live on: the answer is what the trainer would allocate on CUDA. Two workarounds
(DESIGN.md, "Measuring memory"): MemTracker installs a gradient hook on every parameter and fails on
frozen ones (`_StepTracker` skips them), and `nn.Module._apply` cannot swap fake parameters, which
peft's `.to()` calls try (`_fake_safe_swap` assigns `.data` instead).

Depth: the peak of each phase of the step (forward; backward through the loss and head, the top
decoder layer, the bottom decoder layer, the embedding; optimizer step) is linear in the number of
layers of each kind, because every layer adds the same weights, activations and gradients. Layers
between the top and the bottom peak no higher than one of the two (memory moves linearly from "all
activations, no layer gradients" to "no activations, all gradients"). `measure_peak_memory`
therefore measures a 2- and 3-layer copy (1 + one per kind for dense + MoE stacks), extrapolates each
phase to the real depth, and takes the largest.

One rank of an FSDP2 run (`world_size` > 1): the step is the trainer's FSDP path
(`trainer.distributed.shard_model`: every decoder layer and the model sharded, bf16 compute through
FSDP2's MixedPrecisionPolicy, full logits) under torch's fake process group (its test utility
`FakeStore`, backend "fake": collectives return at once), so one process measures rank 0 of a world
of any size: its weight, gradient and AdamW shards and the all-gathered layers and reduce-scattered
gradients that FSDP holds while a layer computes.

What it does not see: CUDA kernels' workspaces (cuBLAS, flash attention), the caching allocator's
fragmentation and the CUDA context; CPU autocast and CPU SDPA kernels stand in for CUDA's when the
fakes live on the CPU (docs/PLANNER.md says how large the difference is expected to be).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

from data.errors import UserError

# Planner method -> what the trainer is told: `full` is mixed precision (fp32 weights, bf16
# autocast), `full_bf16` trains bf16 weights, `lora` a bf16 frozen base with fp32 adapters.
METHOD_CONFIGS: dict[str, dict] = {
    "full": {"method": "full"},
    "full_bf16": {"method": "full", "base_dtype": "bfloat16"},
    "lora": {"method": "lora"},
}
# MemTracker's categories -> the names the planner uses.
_COMPONENTS = {
    _MemRefType.PARAM: "weights", _MemRefType.BUFFER: "weights", _MemRefType.GRAD: "gradients",
    _MemRefType.OPT: "optimizer", _MemRefType.ACT: "activations", _MemRefType.TEMP: "temporaries",
    _MemRefType.OTH: "other",
}
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "temporaries", "other")
# "optimizer" covers the optimizer step and what runs between the end of the backward and it.
PHASES = ("forward", "backward: loss and head", "backward: top layer", "backward: middle layers",
          "backward: bottom layer", "backward: embedding", "optimizer")
_EXTRAPOLATED_PHASES = tuple(p for p in PHASES if p != "backward: middle layers")


@dataclass(frozen=True)
class PhasePeak:
    """The highest allocated total within one phase of the step, and its parts at that moment."""

    phase: str
    total_bytes: float
    components: dict[str, float]


@dataclass(frozen=True)
class StepMemory:
    """The peak allocated bytes of one optimizer step (after the first, so AdamW's state exists).

    Attributes:
        method: `full`, `full_bf16` or `lora`.
        layers: decoder layers of each kind (`dense`, `moe`) the figure is for.
        measured_layers: the layer counts actually run (several when extrapolated).
        peak_bytes: the largest allocated total of the step.
        peak_phase: where it happens.
        components: weights, gradients, optimizer, activations, temporaries, other at the peak.
        phases: each phase's peak.
        seconds: wall time of the measurement.
    """

    method: str
    seq_len: int
    micro_batch: int
    grad_accum_steps: int
    gradient_checkpointing: bool
    device: str
    layers: dict[str, int]
    measured_layers: tuple[dict[str, int], ...]
    peak_bytes: float
    peak_phase: str
    components: dict[str, float]
    phases: tuple[PhasePeak, ...]
    seconds: float
    #: FSDP2 ranks the step is one of (1: a single process, nothing sharded).
    world_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


class _StepTracker(MemTracker):
    """MemTracker that skips frozen parameters' gradient hooks and keeps each phase's peak."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self._layers = layers
        self._layer_names: list[str | None] = []
        self._left_layers = False
        self._backward_done = False
        self.peaks: dict[str, PhasePeak] = {}

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        def grad_hook(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        param_bytes = buffer_bytes = 0
        for param in module.parameters():
            param_bytes += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(param, _MemRefType.PARAM))
            if param.grad is not None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            # MemTracker hooks every parameter; register_hook raises on one that needs no gradient.
            if param.requires_grad and install_grad_hooks and param not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)),
                )
        for buffer in module.buffers():
            buffer_bytes += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER))
        return param_bytes, buffer_bytes

    def _update_peak_stats(self, peak_state) -> None:
        """Per-module peaks are not needed (and walking every module after every op is most of
        MemTracker's cost); `__torch_dispatch__` keeps the per-phase peaks."""

    def _phase(self) -> str:
        if self._in_opt or (self._backward_done and not self._mod_tracker.is_bw):
            return "optimizer"  # the optimizer step, and whatever runs between the backward and it
        if not self._mod_tracker.is_bw:
            return "forward"
        self._backward_done = True
        if len(self._layer_names) != len(self._layers) or None in self._layer_names:
            self._layer_names = [self._mod_tracker.get_known_fqn(layer) for layer in self._layers]
        parents = self._mod_tracker.parents
        inside = [i for i, name in enumerate(self._layer_names) if name in parents]
        if not inside:
            return "backward: embedding" if self._left_layers else "backward: loss and head"
        self._left_layers = True
        index = max(inside)
        if index == len(self._layers) - 1:
            return "backward: top layer"
        return "backward: bottom layer" if index == 0 else "backward: middle layers"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = super().__torch_dispatch__(func, types, args, kwargs)
        total = sum(snap[_TOTAL_KEY] for snap in self._curr_mem_snap.values())
        phase = self._phase()
        if phase not in self.peaks or total > self.peaks[phase].total_bytes:
            parts = dict.fromkeys(COMPONENTS, 0.0)
            for snap in self._curr_mem_snap.values():
                for reftype, name in _COMPONENTS.items():
                    parts[name] += snap.get(reftype, 0)
            self.peaks[phase] = PhasePeak(phase, float(total), parts)
        return result


@contextlib.contextmanager
def _fake_safe_swap():
    """`nn.Module._apply` swaps a fake parameter with its converted copy (torch.utils.swap_tensors),
    which fails when the fake mode holds a weak reference to it; assign `.data` instead, as
    `_apply` does for real tensors."""
    import torch.utils

    original = torch.utils.swap_tensors

    def swap(t1, t2):
        try:
            original(t1, t2)
        except RuntimeError:
            t1.data = t2.data

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


def _decoder_layers(model: nn.Module, num_layers: int) -> list[nn.Module]:
    """The decoder layer stack: the ModuleList of `num_layers` blocks (`model.layers` in transformers)."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not stacks:
        raise UserError(f"Could not find the stack of {num_layers} decoder layers in {type(model).__name__}.")
    return list(stacks[0])


def step_train_config(method: str, *, seq_len: int, micro_batch: int, grad_accum_steps: int,
                      gradient_checkpointing: bool, lora: dict):
    """The TrainConfig of one measured step (also what benchmarks/gpu_check.py runs on a GPU)."""
    from trainer.config import TrainConfig

    if method not in METHOD_CONFIGS:
        raise UserError(
            f"Cannot measure method {method!r}: the trainer runs {', '.join(METHOD_CONFIGS)} "
            "(QLoRA's 4-bit base needs bitsandbytes on a GPU)."
        )
    return TrainConfig(**METHOD_CONFIGS[method], **lora, batch_size=micro_batch, grad_accum_steps=grad_accum_steps,
                       max_length=seq_len, gradient_checkpointing=gradient_checkpointing, checkpoint_every=0)


def prime_step(model, optimizer, grad_accum_steps: int) -> None:
    """Bring a measured step to its steady state: a first AdamW step creates the optimizer's state,
    and with gradient accumulation the step's earlier micro-batches leave gradients behind."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if grad_accum_steps > 1:
        for p in trainable:
            p.grad = torch.zeros_like(p)


def step_batch(seq_len: int, micro_batch: int, vocab_size: int):
    """The trainer's collated micro-batch of `micro_batch` rows `seq_len` wide, every target a
    completion token. With several rows the last is one token shorter: an SFT micro-batch of
    examples of different lengths is padded, so attention gets a mask (transformers then repeats
    GQA's key/value heads and builds a b×1×s×s mask). A single row has no padding, and transformers
    drops an all-ones mask when it can read it (`masking_utils._ignore_causal_mask_sdpa`); on fake
    tensors it cannot, so the harness leaves that mask out, as transformers would on a GPU.
    """
    from data.dataset import IGNORE_INDEX
    from trainer.data import Sequence, collate

    rows = []
    for row in range(micro_batch):
        n = seq_len - (1 if row == micro_batch - 1 and micro_batch > 1 else 0)
        ids = [(7 * row + i) % vocab_size for i in range(n)]
        rows.append(Sequence(ids, ids[1:] + [IGNORE_INDEX], list(range(n))))
    batch = collate(rows, pad_id=0, packed=False)
    if micro_batch == 1:
        del batch.inputs["attention_mask"]
    return batch


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def measure_step_memory(
    model_config: dict,
    method: str,
    *,
    seq_len: int,
    micro_batch: int = 1,
    grad_accum_steps: int = 1,
    gradient_checkpointing: bool = False,
    rank: int = 16,
    targets: str = "all",
    expert_rank_divisor: str = "active",
    target_unembedding: bool = False,
    device: str = "cpu",
    world_size: int = 1,
) -> StepMemory:
    """Peak memory of one trainer step of the model `model_config` (a config.json dict) at its own depth;
    with `world_size` > 1, of rank 0 of that many FSDP2 ranks (the micro-batch is per rank).

    The step is the second optimizer step of a run: AdamW's state exists (made by a first step on
    zero gradients), and with `grad_accum_steps` > 1 the gradients of the earlier micro-batches are
    held while the last one runs. Every target is a completion token; the rows are `seq_len` tokens
    wide (with several rows the last is one token shorter: a padded micro-batch, see `step_batch`).

    Raises:
        UserError: a method the trainer has no path for, or targets/rank the model cannot take.
    """
    from accelerate import Accelerator
    from torch._subclasses.fake_tensor import FakeTensorMode

    from planner.shapes import shape_from_config
    from trainer.distributed import device_mesh, shard_model
    from trainer.lifecycle import build_optimizer
    from trainer.loop import precision
    from trainer.loss import loss_head
    from trainer.model import model_from_config, prepare_model

    started = time.perf_counter()
    config = step_train_config(method, seq_len=seq_len, micro_batch=micro_batch, grad_accum_steps=grad_accum_steps,
                           gradient_checkpointing=gradient_checkpointing,
                           lora={"rank": rank, "targets": targets, "expert_rank_divisor": expert_rank_divisor,
                                 "target_unembedding": target_unembedding})
    shape = shape_from_config(model_config)
    mixed_precision, base_dtype = precision(config, use_cuda=True)
    batch = step_batch(seq_len, micro_batch, shape.vocab_size)
    loss_tokens = int(batch.loss_positions_N.numel()) * grad_accum_steps
    _reset_accelerate()
    try:
        with _fake_process_group(world_size):
            accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device == "cpu")
            mesh = device_mesh(torch.device(device), world_size) if world_size > 1 else None
            with FakeTensorMode(allow_non_fake_inputs=True), torch.device(device):
                with _fake_safe_swap():
                    model, _ = prepare_model(model_from_config(model_config, base_dtype), config)
                    if world_size > 1:  # the loop's FSDP path: shard, then the optimizer over the shards
                        shard_model(model, mesh, mixed_precision)
                        optimizer = build_optimizer(model, config, use_cuda=True)
                    else:
                        optimizer = build_optimizer(model, config, use_cuda=True)
                        model, optimizer = accelerator.prepare(model, optimizer)
                head, _ = loss_head(accelerator.unwrap_model(model), sharded=world_size > 1)
                tracker = _measure_step(model, optimizer, batch, accelerator, head, shape.num_layers,
                                        loss_tokens, grad_accum_steps)
    finally:
        _reset_accelerate()
    peaks = tuple(tracker.peaks[p] for p in PHASES if p in tracker.peaks)
    top = max(peaks, key=lambda p: p.total_bytes)
    layers = dict(shape.layers_by_kind)
    return StepMemory(method, seq_len, micro_batch, grad_accum_steps, gradient_checkpointing, device, layers,
                      (layers,), top.total_bytes, top.phase, top.components, peaks,
                      round(time.perf_counter() - started, 2), world_size)


@contextlib.contextmanager
def _fake_process_group(world_size: int):
    """Rank 0 of a fake world of `world_size` (torch's test process group: collectives do nothing)
    for the measured step; nothing for one process."""
    if world_size == 1:
        yield
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise UserError("A process group is already running in this process: measure sharded steps in a fresh one.")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _measure_step(model, optimizer, batch, accelerator, head, num_layers: int, loss_tokens: int,
                  grad_accum_steps: int) -> _StepTracker:
    """Run the measured (second) step under the tracker; return it with the phases' peaks."""
    from trainer.loss import train_micro_batch

    prime_step(model, optimizer, grad_accum_steps)
    tracker = _StepTracker(_decoder_layers(model, num_layers))
    tracker.track_external(model, optimizer)
    with tracker:
        train_micro_batch(model, batch.to(accelerator.device), accelerator.num_processes / loss_tokens,
                          head=head, backward=accelerator.backward)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tracker


def with_layers(model_config: dict, layers: dict[str, int]) -> dict:
    """A copy of `model_config` with `layers[kind]` decoder layers of each kind, dense ones first.

    Raises:
        UserError: the family's config has no known way to place that many layers of each kind.
    """
    from planner.shapes import shape_from_config

    config = dict(model_config)
    dense, moe = layers.get("dense", 0), layers.get("moe", 0)
    config["num_hidden_layers"] = dense + moe
    if moe:
        if "first_k_dense_replace" in config or "moe_layer_freq" in config:  # DeepSeek-V3
            config.update(first_k_dense_replace=dense, moe_layer_freq=1)
        else:  # Qwen2/3-MoE; Mixtral has no dense layers
            config.update(mlp_only_layers=list(range(dense)), decoder_sparse_step=1)
    got = shape_from_config(config).layers_by_kind
    if got != {k: v for k, v in layers.items() if v}:
        raise UserError(f"Could not build a {layers} layer copy of this {config.get('model_type')} config (got {got}).")
    return config


def _sample_depths(layers: dict[str, int]) -> list[dict[str, int]]:
    """Layer counts to measure: enough points to fit value = c + Σ a_kind · n_kind exactly, with at
    least two layers so that the top and bottom layers differ."""
    base = {kind: 1 for kind in layers} if len(layers) > 1 else {kind: 2 for kind in layers}
    return [base] + [{**base, kind: base[kind] + 1} for kind in layers]


def measure_peak_memory(model_config: dict, method: str, **kwargs) -> StepMemory:
    """`measure_step_memory` for a model of any depth: measured on 2- and 3-layer copies (one more
    copy per extra layer kind) and extrapolated linearly per phase; the peak is the largest phase.

    Takes `measure_step_memory`'s keyword arguments. A model of three layers or fewer is measured
    as it is.
    """
    import numpy as np

    from planner.shapes import shape_from_config

    started = time.perf_counter()
    full = dict(shape_from_config(model_config).layers_by_kind)
    if sum(full.values()) <= 3:
        return measure_step_memory(model_config, method, **kwargs)
    samples = _sample_depths(full)
    runs = [measure_step_memory(with_layers(model_config, counts), method, **kwargs) for counts in samples]
    kinds = list(full)
    design = np.array([[1.0] + [counts[k] for k in kinds] for counts in samples])
    target = np.array([1.0] + [full[k] for k in kinds])
    weights = np.linalg.solve(design.T, target)  # value(full) = Σ weights_i · value(sample_i), exact if linear

    phases = []
    for phase in _EXTRAPOLATED_PHASES:
        measured = [{p.phase: p for p in run.phases}.get(phase) for run in runs]
        if None in measured:
            continue
        parts = {c: float(sum(w * m.components[c] for w, m in zip(weights, measured, strict=True))) for c in COMPONENTS}
        phases.append(PhasePeak(phase, float(sum(w * m.total_bytes for w, m in zip(weights, measured, strict=True))),
                                parts))
    top = max(phases, key=lambda p: p.total_bytes)
    first = runs[0]
    return StepMemory(method, first.seq_len, first.micro_batch, first.grad_accum_steps, first.gradient_checkpointing,
                      first.device, full, tuple(samples), top.total_bytes, top.phase, top.components, tuple(phases),
                      round(time.perf_counter() - started, 2), first.world_size)
