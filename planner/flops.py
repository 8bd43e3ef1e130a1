"""Training FLOPs per token and per run, FullFT and LoRA, matrix by matrix.

Per token, a d_out × d_in matrix costs 2·d_in·d_out forward, the same again for the input
gradient and again for the weight gradient (Kaplan et al. 2020's 6N). Under LoRA a frozen matrix
skips its weight gradient (4·d_in·d_out) and its adapter adds 6·r·(d_in + d_out), so LoRA is
about ⅔ of FullFT (DESIGN.md, "LoRA Without Regret"). Routed experts count only the copies
active per token. The embedding is a lookup: no matmul and no input gradient.

Attention scores (QKᵀ and AV) cost 2·s·d_qk + 2·s·d_v per token per layer forward and three
times that with the backward pass, the same under both methods (PaLM, Chowdhery et al. 2022,
appendix B: 12·L·H·Q·T). This counts the full s × s score matrix, the MFU convention; a causal
kernel skips about half of it, so the true work is lower by up to that term's half.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from planner.gpus import Gpu
from planner.lora import LoraCount
from planner.shapes import ModelShape

# (forward, input grad, weight grad) multiply-adds per weight, ×2 FLOPs each: Kaplan et al. 2020.
FULLFT_FLOPS_PER_WEIGHT = 6
FROZEN_FLOPS_PER_WEIGHT = 4  # no weight gradient
ADAPTER_FLOPS_PER_PARAM = 6  # A and B are trained: forward + input grad + weight grad
BACKWARD_OVER_FORWARD = 2  # attention scores: backward costs twice the forward
DEFAULT_MFU = 0.4  # an assumed model-FLOPs utilisation for bf16 training; pass your measured one


@dataclass(frozen=True)
class MatrixFlops:
    """Training FLOPs per token of one matrix kind, all its active copies together."""

    name: str
    role: str
    fullft_flops_per_token: int
    lora_flops_per_token: int


@dataclass(frozen=True)
class FlopsEstimate:
    """Training FLOPs per token at sequence length `seq_len` (forward + backward)."""

    seq_len: int
    matrices: tuple[MatrixFlops, ...]
    attention_scores_flops_per_token: int
    fullft_flops_per_token: int
    lora_flops_per_token: int

    @property
    def lora_over_fullft(self) -> float:
        return self.lora_flops_per_token / self.fullft_flops_per_token

    def to_dict(self) -> dict:
        return asdict(self) | {"lora_over_fullft": self.lora_over_fullft}


@dataclass(frozen=True)
class RunTime:
    """FLOPs and wall time of a whole run on `num_gpus` × `gpu` at an assumed MFU."""

    tokens: int
    gpu: str
    num_gpus: int
    mfu: float
    fullft_flops: float
    lora_flops: float
    fullft_seconds: float
    lora_seconds: float

    @property
    def fullft_gpu_hours(self) -> float:
        return self.fullft_seconds * self.num_gpus / 3600

    @property
    def lora_gpu_hours(self) -> float:
        return self.lora_seconds * self.num_gpus / 3600

    def to_dict(self) -> dict:
        return asdict(self) | {"fullft_gpu_hours": self.fullft_gpu_hours, "lora_gpu_hours": self.lora_gpu_hours}


def estimate_flops(shape: ModelShape, lora: LoraCount, seq_len: int) -> FlopsEstimate:
    """Training FLOPs per token for FullFT and for the LoRA adapter `lora` at `seq_len`."""
    adapter_rank = {m.name: m.rank for m in lora.matrices}
    rows = []
    for m in shape.matrices:
        if m.role == "embedding":
            rows.append(MatrixFlops(m.name, m.role, 0, 0))
            continue
        weights = m.d_in * m.d_out * m.active_count
        lora_flops = FROZEN_FLOPS_PER_WEIGHT * weights
        if m.name in adapter_rank:
            lora_flops += ADAPTER_FLOPS_PER_PARAM * adapter_rank[m.name] * (m.d_in + m.d_out) * m.active_count
        rows.append(MatrixFlops(m.name, m.role, FULLFT_FLOPS_PER_WEIGHT * weights, lora_flops))
    forward_scores = 2 * seq_len * shape.num_heads * (shape.qk_head_dim + shape.v_head_dim)
    scores = (1 + BACKWARD_OVER_FORWARD) * forward_scores * shape.num_layers
    return FlopsEstimate(
        seq_len=seq_len,
        matrices=tuple(rows),
        attention_scores_flops_per_token=scores,
        fullft_flops_per_token=sum(r.fullft_flops_per_token for r in rows) + scores,
        lora_flops_per_token=sum(r.lora_flops_per_token for r in rows) + scores,
    )


def estimate_run_time(flops: FlopsEstimate, tokens: int, gpu: Gpu, num_gpus: int = 1, mfu: float = DEFAULT_MFU) -> RunTime:
    """FLOPs of a run over `tokens` training tokens and its time at `mfu` of the dense bf16 peak."""
    fullft = float(flops.fullft_flops_per_token) * tokens
    lora = float(flops.lora_flops_per_token) * tokens
    throughput = gpu.peak_bf16_flops * num_gpus * mfu
    return RunTime(tokens, gpu.name, num_gpus, mfu, fullft, lora, fullft / throughput, lora / throughput)
