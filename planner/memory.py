"""GPU memory per device for FullFT, LoRA and QLoRA training, and the fewest GPUs that fit.

memory = weights + gradients + optimizer state (divided over N GPUs by FSDP / ZeRO-3)
       + activations + logits (per GPU, for its own micro-batch) + a stated overhead.

Every constant below is a prior from the cited source; the GPU tests will calibrate them against
`torch.cuda.max_memory_allocated`, which sees `allocated_bytes` (everything but the overhead).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from planner.errors import UserError
from planner.gpus import GB, Gpu
from planner.shapes import ModelShape


@dataclass(frozen=True)
class MethodBytes:
    """Bytes per parameter of one training method.

    Attributes:
        frozen_bytes_per_param: a frozen base weight (LoRA, QLoRA); FullFT trains every weight.
        frozen_outer_bytes_per_param: the embedding and unembedding when frozen (QLoRA keeps them
            in bf16; bitsandbytes only quantises the linear layers).
        weight_bytes_per_param, grad_bytes_per_param, optimizer_bytes_per_param: a trained
            parameter's copies, gradient and AdamW state.
    """

    name: str
    frozen_bytes_per_param: float
    frozen_outer_bytes_per_param: float
    weight_bytes_per_param: float
    grad_bytes_per_param: float
    optimizer_bytes_per_param: float
    source: str


METHODS: dict[str, MethodBytes] = {
    # HF docs, "Model training anatomy": mixed precision keeps an fp32 master (4) and a bf16 copy
    # (2), fp32 gradients (4) and AdamW's m and v in fp32 (8): 18 bytes per parameter.
    "full": MethodBytes("full", 0, 0, 6, 4, 8,
                        "https://huggingface.co/docs/transformers/model_memory_anatomy (mixed-precision AdamW)"),
    # Pure bf16 weights and gradients with fp32 AdamW state: 2 + 2 + 8 = 12 (DESIGN.md: 12-16).
    "full_bf16": MethodBytes("full_bf16", 0, 0, 2, 2, 8, "DESIGN.md (pure-bf16 AdamW, 12-16 B/param)"),
    # Frozen bf16 base (2) and an fp32 adapter (peft's default) with fp32 gradients and AdamW: 16.
    "lora": MethodBytes("lora", 2, 2, 4, 4, 8, "DESIGN.md (frozen bf16 base) + fp32 adapter with AdamW"),
    # NF4 with double quantisation is 4.127 bits per weight (Dettmers et al. 2023, QLoRA §2), 0.52 B;
    # 0.55 adds quantisation state and padding. Embedding and lm_head stay bf16.
    "qlora": MethodBytes("qlora", 0.55, 2, 4, 4, 8, "Dettmers et al. 2023 (QLoRA) NF4 + double quantisation"),
}

# Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 2):
# a GPT block stores s·b·h·(34 + 5·a·s/h) bytes with 16-bit activations and no parallelism.
# Memory-efficient (flash / SDPA) attention drops the 5·a·s/h score term.
ACTIVATION_BYTES_PER_SBH = 34
ATTENTION_SCORE_BYTES_COEF = 5
# With full recomputation each layer keeps only its bf16 input: 2·s·b·h (Korthikanti et al. §4).
CHECKPOINT_BYTES_PER_SBH = 2
# Logits: bf16 output (2) + fp32 upcast for the loss (4) + fp32 gradient of the logits (4).
LOGITS_BYTES_PER_ELEMENT = 2 + 4 + 4
# CUDA context, cuBLAS/NCCL workspaces (~1 GB) and allocator fragmentation (~5%): priors.
OVERHEAD_FIXED_BYTES = 1 * GB
OVERHEAD_FRACTION = 0.05
GPU_COUNTS = tuple(2**i for i in range(11))  # 1, 2, 4, ..., 1024


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on each of `num_gpus` GPUs for one method, micro-batch and sequence length."""

    method: str
    num_gpus: int
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    logits_bytes: float
    overhead_bytes: float

    @property
    def allocated_bytes(self) -> float:
        """What `torch.cuda.max_memory_allocated` should see (no context, no fragmentation)."""
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes + self.logits_bytes

    @property
    def total_bytes(self) -> float:
        return self.allocated_bytes + self.overhead_bytes

    def to_dict(self) -> dict:
        return asdict(self) | {"allocated_bytes": self.allocated_bytes, "total_bytes": self.total_bytes}


@dataclass(frozen=True)
class Fit:
    """The fewest GPUs (powers of two) on which a method fits, and the micro-batch to use there.

    `max_micro_batch` is the largest micro-batch that fits; `micro_batch` the largest one up to it
    that divides the per-GPU share of the batch, so micro-batches × accumulation steps give the
    requested batch exactly. `num_gpus` is None when no count up to the largest tried fits even micro-batch 1.
    `effective_batch` = micro_batch × num_gpus × grad_accum_steps: above the requested batch when
    more GPUs than sequences per step are needed.
    """

    method: str
    gpu: str
    num_gpus: int | None
    micro_batch: int | None
    max_micro_batch: int | None
    gradient_checkpointing: bool
    grad_accum_steps: int | None
    effective_batch: int | None
    total_bytes: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, gradient_checkpointing: bool = False,
                     memory_efficient_attention: bool = True) -> float:
    """Saved activations of the layer stack (Korthikanti et al. 2022), for one micro-batch."""
    sbh = seq_len * micro_batch * shape.hidden_size
    per_layer = sbh * ACTIVATION_BYTES_PER_SBH
    if not memory_efficient_attention:
        per_layer += ATTENTION_SCORE_BYTES_COEF * shape.num_heads * seq_len * seq_len * micro_batch
    if gradient_checkpointing:  # every layer's input, plus one layer recomputed in full
        return shape.num_layers * CHECKPOINT_BYTES_PER_SBH * sbh + per_layer
    return shape.num_layers * per_layer


def estimate_memory(
    shape: ModelShape,
    adapter_params: int,
    method: str,
    seq_len: int,
    micro_batch: int = 1,
    num_gpus: int = 1,
    gradient_checkpointing: bool = False,
    memory_efficient_attention: bool = True,
) -> MemoryEstimate:
    """Bytes per GPU; weights, gradients and optimizer state are sharded over `num_gpus`.

    Raises:
        UserError: unknown method.
    """
    if method not in METHODS:
        raise UserError(f"Unknown training method {method!r}: use one of {', '.join(METHODS)}.")
    mb = METHODS[method]
    if method.startswith("full"):
        trained, frozen_bytes = shape.total_params, 0.0
    else:
        outer = sum(m.params for m in shape.matrices if m.role in ("embedding", "unembedding"))
        trained = adapter_params
        frozen_bytes = (shape.total_params - outer) * mb.frozen_bytes_per_param + outer * mb.frozen_outer_bytes_per_param
    weights = (frozen_bytes + trained * mb.weight_bytes_per_param) / num_gpus
    grads = trained * mb.grad_bytes_per_param / num_gpus
    optimizer = trained * mb.optimizer_bytes_per_param / num_gpus
    activations = activation_bytes(shape, seq_len, micro_batch, gradient_checkpointing, memory_efficient_attention)
    logits = float(micro_batch * seq_len * shape.vocab_size * LOGITS_BYTES_PER_ELEMENT)
    overhead = OVERHEAD_FIXED_BYTES + OVERHEAD_FRACTION * (weights + grads + optimizer + activations + logits)
    return MemoryEstimate(method, num_gpus, micro_batch, seq_len, gradient_checkpointing,
                          weights, grads, optimizer, activations, logits, overhead)


def _largest_micro_batch(fits, max_micro_batch: int) -> int:
    """Binary search for the largest b in 1..max_micro_batch with fits(b); 0 if none."""
    lo, hi = 0, max_micro_batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_hardware(
    shape: ModelShape,
    adapter_params: int,
    method: str,
    gpu: Gpu,
    seq_len: int,
    batch_size: int,
    num_gpus: int | None = None,
) -> Fit:
    """The fewest GPUs in `GPU_COUNTS` (or exactly `num_gpus`) that fit, and the largest micro-batch.

    A micro-batch never exceeds the effective batch divided over the GPUs. Without gradient
    checkpointing first; with it only when micro-batch 1 does not fit otherwise.
    """
    for n in (num_gpus,) if num_gpus else GPU_COUNTS:
        cap = max(1, batch_size // n)
        for checkpointing in (False, True):
            def fits(b, n=n, checkpointing=checkpointing):
                estimate = estimate_memory(shape, adapter_params, method, seq_len, b, n, checkpointing)
                return estimate.total_bytes <= gpu.memory_bytes

            largest = _largest_micro_batch(fits, cap)
            if largest:
                share = batch_size // n if batch_size % n == 0 else 0
                b = max((d for d in range(1, largest + 1) if share % d == 0), default=largest) if share else largest
                total = estimate_memory(shape, adapter_params, method, seq_len, b, n, checkpointing).total_bytes
                accum = -(-batch_size // (b * n))
                return Fit(method, gpu.name, n, b, largest, checkpointing, accum, b * n * accum, total)
    return Fit(method, gpu.name, None, None, None, False, None, None, None)
