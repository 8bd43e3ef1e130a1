"""FLOPs per token: hand arithmetic on Llama-3.1-8B and Qwen3-30B-A3B."""

import pytest

from planner.flops import estimate_flops, estimate_run_time
from planner.gpus import get_gpu
from planner.lora import count_lora_params
from planner.shapes import load_shape

# Llama-3.1-8B weights without the embedding: 8,029,995,008 - 128,256 × 4,096.
LLAMA_8B_MATMUL_WEIGHTS = 8_029_995_008 - 128_256 * 4_096


def llama_scores(seq_len):  # 3 × (QKᵀ + AV) forward = 3 × 2·s·(32·128 + 32·128), 32 layers
    return 3 * 2 * seq_len * (32 * 128 + 32 * 128) * 32


@pytest.mark.parametrize("seq_len", [1, 512, 2048, 8192])
@pytest.mark.parametrize("rank", [1, 16, 256])
def test_llama_8b_flops_per_token(seq_len, rank):
    shape = load_shape("Llama-3.1-8B")
    flops = estimate_flops(shape, count_lora_params(shape, rank), seq_len)
    assert flops.attention_scores_flops_per_token == llama_scores(seq_len)
    assert flops.fullft_flops_per_token == 6 * LLAMA_8B_MATMUL_WEIGHTS + llama_scores(seq_len)
    assert flops.lora_flops_per_token == (
        4 * LLAMA_8B_MATMUL_WEIGHTS + 6 * rank * 2_621_440 + llama_scores(seq_len)
    )


def test_lora_is_about_two_thirds_and_rises_with_seq_len():
    shape = load_shape("Llama-3.1-8B")
    count = count_lora_params(shape, 16)
    short, long = estimate_flops(shape, count, 128), estimate_flops(shape, count, 131072)
    assert 0.667 < short.lora_over_fullft < 0.68
    assert long.lora_over_fullft > short.lora_over_fullft


def test_moe_counts_only_active_experts():
    shape = load_shape("Qwen3-30B-A3B")
    flops = estimate_flops(shape, count_lora_params(shape, 8), 1)
    # per layer: attention 2048·(4096+512+512) + 4096·2048, router 2048·128, 8 experts × (2048·1536 + 768·2048)
    per_layer = 2048 * 5120 + 4096 * 2048 + 2048 * 128 + 8 * (2048 * 1536 + 768 * 2048)
    weights = 48 * per_layer + 2048 * 151_936
    scores = 3 * 2 * 1 * (32 * 128 * 2) * 48
    assert flops.fullft_flops_per_token == 6 * weights + scores


def test_run_time_uses_peak_mfu_and_gpus():
    shape = load_shape("Llama-3.1-8B")
    flops = estimate_flops(shape, count_lora_params(shape, 16), 2048)
    run = estimate_run_time(flops, 10**9, get_gpu("H100"), num_gpus=8, mfu=0.4)
    assert run.fullft_seconds == pytest.approx(flops.fullft_flops_per_token * 1e9 / (8 * 0.4 * 989.4e12))
    assert run.lora_seconds / run.fullft_seconds == pytest.approx(flops.lora_over_fullft)
    assert run.to_dict()["lora_gpu_hours"] == pytest.approx(run.lora_seconds * 8 / 3600)
