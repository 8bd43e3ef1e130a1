"""GPU memory per device for FullFT, LoRA and QLoRA training, and the fewest GPUs that fit.

A training step peaks in one of three phases, and the estimate is the largest of them:

    forward   W + O + G_held + L·A + S_forward    (all activations saved, the loss computed)
    backward  W + O + G_held + L·A + S_backward   (the loss and top layer's backward, recompute)
    bottom    W + O + G − G_emb  + S_bottom       (the first layer's backward: all but the embedding's gradient)
    end       W + O + G      + S_end              (all gradients made; the optimizer step)

W, G, O are the weights, gradients and AdamW state (divided over N GPUs by FSDP2); G_held
is G when gradient accumulation keeps earlier micro-batches' gradients, else the gradients made
by then (the output layer's). A is one decoder layer's saved activations and S the step's other bytes (loss, output
layer, one layer's backward temporaries, its recomputation under gradient checkpointing): both
per GPU, for its own micro-batch, as sums of measured bytes per unit of the shape's dimensions
(`MEASURED`). Every constant was measured by running the trainer's own step (trainer/memory.py:
PyTorch's MemTracker on fake tensors), with the command named in its source; the fit and the
comparison with the measurement on a grid of set-ups are in benchmarks/memory_model.py and
benchmarks/MEMORY_RESULTS.md. `allocated_bytes` is what `torch.cuda.max_memory_allocated` sees;
On N > 1 GPUs the step is the trainer's FSDP2 step (trainer/distributed.py), one rank's share
plus what FSDP2 holds unsharded while it computes: the root group's (embedding, output layer)
and one decoder layer's all-gathered bf16 weights, and in the backward that layer's gradients
before their reduce-scatter; FullFT computes in bf16 there (MixedPrecisionPolicy), so its saved
activations are bf16 training's (`full_bf16`). Checked against one rank of 2, 4 and 8 measured
under a fake process group (`python benchmarks/memory_model.py --sharded`).
`total_bytes` adds a stated overhead (CUDA context, kernel workspaces, fragmentation) that no CPU
measurement contains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from data.errors import UserError
from planner.gpus import GB, Gpu
from planner.shapes import ModelShape

FIT_COMMAND = "python benchmarks/memory_model.py --fit"


@dataclass(frozen=True)
class MethodBytes:
    """Bytes per parameter of one training method.

    Attributes:
        frozen_bytes_per_param: a frozen base weight (LoRA, QLoRA); FullFT trains every weight.
        frozen_outer_bytes_per_param: the embedding and unembedding when frozen (QLoRA keeps them
            in bf16; bitsandbytes only quantises the linear layers).
        weight_bytes_per_param, grad_bytes_per_param, optimizer_bytes_per_param: a trained
            parameter's weight, gradient and AdamW state.
    """

    name: str
    frozen_bytes_per_param: float
    frozen_outer_bytes_per_param: float
    weight_bytes_per_param: float
    grad_bytes_per_param: float
    optimizer_bytes_per_param: float
    source: str


METHODS: dict[str, MethodBytes] = {
    # fp32 weights under bf16 autocast: fp32 weight, gradient and AdamW m, v. The bf16 copies
    # autocast makes are saved activations (they live from a layer's forward to its backward).
    "full": MethodBytes("full", 0, 0, 4, 4, 8, f"measured: {FIT_COMMAND} (trainer: fp32 weights, bf16 autocast)"),
    # bf16 weights and gradients; torch's AdamW keeps its state in the parameter's dtype (2 + 2).
    "full_bf16": MethodBytes("full_bf16", 0, 0, 2, 2, 4, f"measured: {FIT_COMMAND} (trainer: base_dtype=bfloat16)"),
    # Frozen bf16 base (2) and peft's fp32 adapter with fp32 gradients and AdamW state (4 + 4 + 8).
    "lora": MethodBytes("lora", 2, 2, 4, 4, 8, f"measured: {FIT_COMMAND} (trainer: bf16 base, peft fp32 adapter)"),
    # NF4 with double quantisation is 4.127 bits per weight (Dettmers et al. 2023, QLoRA §2), 0.52 B;
    # 0.55 adds quantisation state and padding. Embedding and lm_head stay bf16. Not measured: the
    # trainer has no QLoRA path; its activations are taken as LoRA's.
    "qlora": MethodBytes("qlora", 0.55, 2, 4, 4, 8, "Dettmers et al. 2023 (QLoRA) NF4 + double quantisation"),
}

# The trainer's loss path (trainer/loss.py imports these): the chunked completion loss for the
# causal LMs whose logits are exactly `lm_head(final hidden states)` in transformers 5 (read in each
# `modeling_<type>.py`: no soft-capping, no logit scale after the head; Gemma 2/3, Cohere and
# Granite are not and build every position's logits).
CHUNKED_MODEL_TYPES = frozenset({
    "deepseek_v3", "gemma", "gpt_oss", "llama", "mistral", "mixtral", "olmo2", "phi3", "qwen2",
    "qwen2_moe", "qwen3", "qwen3_moe", "smollm3",
})
# Positions per chunk: bounds the fp32 logits held at once to CHUNK_TOKENS × V × 4 bytes
# (128k vocabulary: 2.1 GB) while keeping each matmul large enough to run at full speed.
CHUNK_TOKENS = 4096
# Families whose attention normalises q and k per head (an RMSNorm over head_dim; transformers'
# modeling_qwen3*.py), which saves its fp32 input and output.
QK_NORM_MODEL_TYPES = frozenset({"qwen3", "qwen3_moe", "qwen3_next", "olmo2"})

# No key/value width: transformers repeats GQA's key/value heads to the query heads before attention
# (a padded micro-batch; CPU attention always), so what attention keeps scales with the query width.
LAYER_FEATURES = ("hidden_tokens", "q_tokens", "qk_norm_tokens", "ffn_tokens",
                  "routed_hidden_tokens", "routed_ffn_tokens", "expert_tokens", "tokens", "params",
                  "expert_params", "padding_mask")
# With gradient checkpointing a layer keeps only its input (the residual stream).
CHECKPOINT_LAYER_FEATURES = ("hidden_tokens",)
STEP_FEATURES = ("hidden_tokens", "tokens", "chunk_vocab", "next_chunk_vocab", "vocab_hidden", "layer_activations",
                 "layer_params")
PHASES = ("forward", "backward", "bottom", "end")


@dataclass(frozen=True)
class StepBytes:
    """Measured bytes of one method's step beyond its weights, gradients and optimizer state.

    Attributes:
        layer: one decoder layer's saved activations, bytes per unit of each `LAYER_FEATURES`
            entry (e.g. `hidden_tokens` = tokens × hidden_size).
        phases: the rest of each phase (`PHASES`), bytes per unit of each `STEP_FEATURES` entry;
            `layer_activations` is one layer's activations without checkpointing (a layer's
            backward temporaries, and its recomputation under gradient checkpointing).
        source: how the numbers were measured.
    """

    layer: dict[str, float]
    phases: dict[str, dict[str, float]]
    source: str


# (method, gradient checkpointing) -> StepBytes: printed by `python benchmarks/memory_model.py --fit`
# (non-negative least squares over the design shapes' measured steps; benchmarks/MEMORY_RESULTS.md
# checks them on real shapes). Re-run it when the trainer's step changes (loss path, precision, peft).
SOURCE = f"measured: {FIT_COMMAND}"
MEASURED: dict[tuple[str, bool], StepBytes] = {
    ('lora', False): StepBytes(
        layer={'hidden_tokens': 17.76, 'q_tokens': 9.876, 'qk_norm_tokens': 4.083, 'ffn_tokens': 8.134, 'routed_hidden_tokens': 3.613, 'routed_ffn_tokens': 8.028, 'params': 0.01557, 'expert_params': 2.003, 'padding_mask': 1.968},
        phases={
            'forward': {'hidden_tokens': 5.947, 'tokens': 951.3, 'chunk_vocab': 6.015, 'next_chunk_vocab': 5.958, 'vocab_hidden': 0.01162},
            'backward': {'hidden_tokens': 1.871, 'tokens': 12590.0, 'layer_activations': 0.2578},
            'bottom': {'layer_activations': 1.22, 'layer_params': 0.142},
            'end': {},
        },
        source=SOURCE,
    ),
    ('lora', True): StepBytes(
        layer={'hidden_tokens': 2.0},
        phases={
            'forward': {'hidden_tokens': 14.62, 'chunk_vocab': 4.664, 'next_chunk_vocab': 6.485, 'vocab_hidden': 0.1952, 'layer_params': 0.74},
            'backward': {'hidden_tokens': 15.78, 'tokens': 4864.0, 'layer_activations': 1.23, 'layer_params': 0.005454},
            'bottom': {'hidden_tokens': 17.68, 'tokens': 5646.0, 'layer_activations': 1.227},
            'end': {'hidden_tokens': 4.0},
        },
        source=SOURCE,
    ),
    ('full_bf16', False): StepBytes(
        layer={'hidden_tokens': 15.9, 'q_tokens': 8.009, 'qk_norm_tokens': 6.03, 'ffn_tokens': 7.994, 'routed_hidden_tokens': 4.011, 'routed_ffn_tokens': 7.991, 'expert_tokens': 3.037, 'tokens': 526.8, 'padding_mask': 2.013},
        phases={
            'forward': {'hidden_tokens': 11.89, 'chunk_vocab': 10.04, 'next_chunk_vocab': 1.926, 'vocab_hidden': 2.023, 'layer_activations': 0.005746},
            'backward': {'hidden_tokens': 9.998, 'tokens': 123.9, 'vocab_hidden': 8.0},
            'bottom': {'hidden_tokens': 12.73, 'tokens': 91910.0, 'next_chunk_vocab': 0.0533, 'layer_activations': 0.5065},
            'end': {'hidden_tokens': 2.0},
        },
        source=SOURCE,
    ),
    ('full_bf16', True): StepBytes(
        layer={'hidden_tokens': 2.0},
        phases={
            'forward': {'hidden_tokens': 11.75, 'tokens': 3333.0, 'chunk_vocab': 10.03, 'next_chunk_vocab': 1.896, 'vocab_hidden': 2.012, 'layer_activations': 0.01872},
            'backward': {'tokens': 89710.0, 'vocab_hidden': 7.355, 'layer_params': 0.4684},
            'bottom': {'hidden_tokens': 12.17, 'layer_activations': 0.9937},
            'end': {'hidden_tokens': 2.0},
        },
        source=SOURCE,
    ),
    ('full', False): StepBytes(
        layer={'hidden_tokens': 25.86, 'q_tokens': 8.008, 'qk_norm_tokens': 6.02, 'ffn_tokens': 7.969, 'tokens': 1021.0, 'params': 2.002, 'padding_mask': 2.015},
        phases={
            'forward': {'hidden_tokens': 19.99, 'tokens': 688.8, 'chunk_vocab': 9.984, 'next_chunk_vocab': 2.003, 'vocab_hidden': 2.0, 'layer_activations': 0.0003515},
            'backward': {'hidden_tokens': 15.97, 'tokens': 175.7, 'vocab_hidden': 4.0, 'layer_activations': 0.0006184},
            'bottom': {'tokens': 297800.0, 'next_chunk_vocab': 0.3417},
            'end': {'hidden_tokens': 4.0},
        },
        source=SOURCE,
    ),
    ('full', True): StepBytes(
        layer={'hidden_tokens': 4.0},
        phases={
            'forward': {'hidden_tokens': 18.46, 'tokens': 7630.0, 'chunk_vocab': 9.951, 'next_chunk_vocab': 1.982, 'vocab_hidden': 1.985, 'layer_activations': 0.01982},
            'backward': {'tokens': 87790.0, 'vocab_hidden': 2.327, 'layer_activations': 0.5011, 'layer_params': 1.949},
            'bottom': {'tokens': 317900.0},
            'end': {'hidden_tokens': 4.0},
        },
        source=SOURCE,
    ),
}

# CUDA context, cuBLAS/NCCL workspaces (~1 GB) and allocator fragmentation (~5%): priors, not in a
# CPU measurement (docs/PLANNER.md); the GPU check compares `allocated_bytes` with
# torch.cuda.max_memory_allocated and the total with nvidia-smi.
# FSDP2 all-gathers in the compute dtype: bf16 under the trainer's MixedPrecisionPolicy on GPU
# (trainer/distributed.py), and a LoRA base is bf16 already.
FSDP_GATHER_BYTES_PER_PARAM = 2
OVERHEAD_FIXED_BYTES = 1 * GB
OVERHEAD_FRACTION = 0.05
GPU_COUNTS = tuple(2**i for i in range(11))  # 1, 2, 4, ..., 1024


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on each of `num_gpus` GPUs for one method, micro-batch and sequence length, at the
    step's peak (`peak_phase`); the parts are those present at that moment."""

    method: str
    num_gpus: int
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    grad_accum_steps: int
    peak_phase: str
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    temporaries_bytes: float
    overhead_bytes: float

    @property
    def allocated_bytes(self) -> float:
        """What `torch.cuda.max_memory_allocated` should see (no context, no fragmentation)."""
        return (self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes
                + self.temporaries_bytes)

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


def _layer_params(shape: ModelShape, kind: str) -> tuple[float, float]:
    """(non-expert, routed-expert) weights of one decoder layer of `kind` (`dense` or `moe`)."""
    dense = experts = 0.0
    for m in shape.matrices:
        if m.layer_kind not in ("all", kind):
            continue
        holding = shape.num_layers if m.layer_kind == "all" else shape.layers_by_kind[m.layer_kind]
        per_layer = m.params / holding
        if m.role == "routed_expert":
            experts += per_layer
        else:
            dense += per_layer
    return dense, experts


def layer_features(shape: ModelShape, kind: str, seq_len: int, micro_batch: int) -> dict[str, float]:
    """The dimensions one decoder layer's activations scale with, for a micro-batch of `micro_batch`
    rows `seq_len` tokens wide (bytes = Σ feature × StepBytes.layer[feature])."""
    tokens = float(seq_len * micro_batch)
    q_dim = shape.num_heads * shape.qk_head_dim
    kv_dim = shape.num_kv_heads * shape.qk_head_dim
    ffn = sum(m.d_out for m in shape.matrices if m.role in ("mlp", "shared_expert")
              and m.name.rsplit(".", 1)[-1] == "up_proj" and m.layer_kind in ("all", kind))
    params, expert_params = _layer_params(shape, kind)
    moe = kind == "moe"
    moe_ffn = next((m.d_in for m in shape.matrices if m.name == "experts.down_proj"), 0) if moe else 0
    return {
        "hidden_tokens": tokens * shape.hidden_size,
        "q_tokens": tokens * q_dim,
        "qk_norm_tokens": tokens * (q_dim + kv_dim) if shape.model_type in QK_NORM_MODEL_TYPES else 0.0,
        "ffn_tokens": tokens * ffn,
        "routed_hidden_tokens": tokens * shape.experts_per_token * shape.hidden_size if moe else 0.0,
        "routed_ffn_tokens": tokens * shape.experts_per_token * moe_ffn if moe else 0.0,
        "expert_tokens": tokens * shape.num_experts if moe else 0.0,
        "tokens": tokens,
        "params": params,
        "expert_params": expert_params,
        # A padded micro-batch gets a b×1×s×s attention mask, made additive in each layer.
        "padding_mask": float(micro_batch * seq_len * seq_len) if micro_batch > 1 else 0.0,
    }


def step_features(shape: ModelShape, seq_len: int, micro_batch: int, layer_activations: float) -> dict[str, float]:
    """The dimensions the rest of a step scales with (bytes = Σ feature × StepBytes.phases[phase][feature])."""
    tokens = float(seq_len * micro_batch)
    chunk = min(tokens, CHUNK_TOKENS) if shape.model_type in CHUNKED_MODEL_TYPES else tokens
    top = "moe" if shape.is_moe else "dense"
    params, expert_params = _layer_params(shape, top)
    # The loss walks its positions in chunks; while a chunk's logits are made the previous chunk's
    # are still held, so a second chunk adds to the peak (measured), a third does not.
    next_chunk = min(max(tokens - chunk, 0.0), chunk) if shape.model_type in CHUNKED_MODEL_TYPES else 0.0
    return {
        "hidden_tokens": tokens * shape.hidden_size,
        "tokens": tokens,
        "chunk_vocab": chunk * shape.vocab_size,
        "next_chunk_vocab": next_chunk * shape.vocab_size,
        "vocab_hidden": float(shape.vocab_size * shape.hidden_size),
        "layer_activations": layer_activations,
        "layer_params": params + expert_params,
    }


def _dot(coefficients: dict[str, float], features: dict[str, float]) -> float:
    return sum(c * features[name] for name, c in coefficients.items())


def _measured(method: str, gradient_checkpointing: bool) -> StepBytes:
    key = ("lora" if method == "qlora" else method, gradient_checkpointing)
    if key not in MEASURED:
        raise UserError(f"No measured memory constants for {key}: run {FIT_COMMAND}.")
    return MEASURED[key]


def estimate_memory(
    shape: ModelShape,
    adapter_params: int,
    method: str,
    seq_len: int,
    micro_batch: int = 1,
    num_gpus: int = 1,
    gradient_checkpointing: bool = False,
    grad_accum_steps: int = 1,
) -> MemoryEstimate:
    """Bytes per GPU at the step's peak; weights, gradients and optimizer state sharded over `num_gpus`.

    Raises:
        UserError: unknown method.
    """
    if method not in METHODS:
        raise UserError(f"Unknown training method {method!r}: use one of {', '.join(METHODS)}.")
    mb = METHODS[method]
    outer_matrices = [m for m in shape.matrices if m.role in ("embedding", "unembedding")]
    outer = sum(m.params for m in outer_matrices)
    if method.startswith("full"):
        trained, frozen_bytes = shape.total_params, 0.0
        outer_grads = {role: sum(m.params for m in outer_matrices if m.role == role) * mb.grad_bytes_per_param
                       for role in ("embedding", "unembedding")}
    else:
        trained = adapter_params
        frozen_bytes = (shape.total_params - outer) * mb.frozen_bytes_per_param + outer * mb.frozen_outer_bytes_per_param
        outer_grads = {"embedding": 0.0, "unembedding": 0.0}
    weights = (frozen_bytes + trained * mb.weight_bytes_per_param) / num_gpus
    grads = trained * mb.grad_bytes_per_param / num_gpus
    optimizer = trained * mb.optimizer_bytes_per_param / num_gpus
    # Gradients held during the forward and backward: all of them when earlier micro-batches of the
    # step left theirs; otherwise those the backward has made by its top layer (the output layer's).
    held = grads if grad_accum_steps > 1 else outer_grads["unembedding"] / num_gpus
    # At the first layer's backward every gradient but the embedding's exists (with accumulation, all).
    before_embedding = grads if grad_accum_steps > 1 else grads - outer_grads["embedding"] / num_gpus

    top = "moe" if shape.is_moe else "dense"
    gathered = layer_grads = 0.0
    compute = method
    if num_gpus > 1:  # the FSDP2 step (module docstring)
        layer = sum(_layer_params(shape, top))
        gathered = FSDP_GATHER_BYTES_PER_PARAM * (outer + layer)
        trained_per_layer = layer if method.startswith("full") else adapter_params / shape.num_layers
        layer_grads = trained_per_layer * mb.grad_bytes_per_param
        compute = "full_bf16" if method == "full" else method
    measured = _measured(compute, gradient_checkpointing)
    activations = 0.0
    for kind, count in shape.layers_by_kind.items():
        activations += count * _dot(measured.layer, layer_features(shape, kind, seq_len, micro_batch))
    full_layer = _dot(_measured(compute, False).layer, layer_features(shape, top, seq_len, micro_batch))
    rest = {phase: _dot(measured.phases[phase], step_features(shape, seq_len, micro_batch, full_layer))
            for phase in PHASES}
    candidates = {  # (gathered weights, gradients, activations, temporaries) held in each phase
        "forward": (gathered, held, activations, rest["forward"]),
        "backward": (gathered, held + layer_grads, activations, rest["backward"]),
        "bottom": (gathered, before_embedding + layer_grads, 0.0, rest["bottom"]),
        "end": (0.0, grads, 0.0, rest["end"]),
    }
    phase = max(candidates, key=lambda p: sum(candidates[p]))
    gathered_now, grads_now, activations_now, temporaries = candidates[phase]
    weights += gathered_now
    allocated = weights + grads_now + optimizer + activations_now + temporaries
    overhead = OVERHEAD_FIXED_BYTES + OVERHEAD_FRACTION * allocated
    return MemoryEstimate(method, num_gpus, micro_batch, seq_len, gradient_checkpointing, grad_accum_steps, phase,
                          weights, grads_now, optimizer, activations_now, temporaries, overhead)


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

    A micro-batch never exceeds the effective batch divided over the GPUs; the gradient
    accumulation it implies is part of the estimate (accumulated gradients are held through the
    next micro-batch). Without gradient checkpointing first; with it only when micro-batch 1 does
    not fit otherwise.
    """
    for n in (num_gpus,) if num_gpus else GPU_COUNTS:
        cap = max(1, batch_size // n)
        for checkpointing in (False, True):
            def estimate(b, n=n, checkpointing=checkpointing):
                accum = -(-batch_size // (b * n))
                return estimate_memory(shape, adapter_params, method, seq_len, b, n, checkpointing, accum)

            # Not monotone in b: the largest micro-batch may need no accumulation, and so hold no
            # gradients through the forward, where a smaller one does.
            fitting = [b for b in range(1, cap + 1) if estimate(b).total_bytes <= gpu.memory_bytes]
            if fitting:
                share = batch_size // n if batch_size % n == 0 else 0
                b = max((d for d in fitting if share and share % d == 0), default=fitting[-1])
                accum = -(-batch_size // (b * n))
                return Fit(method, gpu.name, n, b, fitting[-1], checkpointing, accum, b * n * accum,
                           estimate(b).total_bytes)
    return Fit(method, gpu.name, None, None, None, False, None, None, None)
