"""GPU memory: hand arithmetic on Llama-3.1-8B, sharding, and the fewest-GPUs search."""

import pytest

from planner.errors import UserError
from planner.gpus import get_gpu
from planner.memory import estimate_memory, fit_hardware
from planner.shapes import load_shape

PARAMS = 8_029_995_008
EMBED = 128_256 * 4_096  # embedding and (untied) lm_head each
SBH = 2048 * 4096  # s = 2048, b = 1, h = 4096
LOGITS = 2048 * 128_256 * (2 + 4 + 4)


@pytest.mark.parametrize(
    "method, weights, grads, optimizer",
    [
        ("full", 6 * PARAMS, 4 * PARAMS, 8 * PARAMS),
        ("full_bf16", 2 * PARAMS, 2 * PARAMS, 8 * PARAMS),
        ("lora", 2 * PARAMS + 4 * 1000, 4 * 1000, 8 * 1000),
        ("qlora", 0.55 * (PARAMS - 2 * EMBED) + 2 * 2 * EMBED + 4 * 1000, 4 * 1000, 8 * 1000),
    ],
)
@pytest.mark.parametrize("num_gpus", [1, 8])
def test_llama_8b_bytes(method, weights, grads, optimizer, num_gpus):
    m = estimate_memory(load_shape("Llama-3.1-8B"), 1000, method, 2048, 1, num_gpus)
    assert m.weights_bytes == pytest.approx(weights / num_gpus)
    assert m.grads_bytes == pytest.approx(grads / num_gpus)
    assert m.optimizer_bytes == pytest.approx(optimizer / num_gpus)
    assert m.activations_bytes == 34 * SBH * 32  # not sharded: each GPU has its own micro-batch
    assert m.logits_bytes == LOGITS
    assert m.overhead_bytes == pytest.approx(1e9 + 0.05 * m.allocated_bytes)


def test_checkpointing_and_attention_scores():
    shape = load_shape("Llama-3.1-8B")
    ckpt = estimate_memory(shape, 0, "lora", 2048, 2, gradient_checkpointing=True)
    assert ckpt.activations_bytes == 32 * 2 * 2 * SBH + 34 * 2 * SBH
    eager = estimate_memory(shape, 0, "lora", 2048, 1, memory_efficient_attention=False)
    assert eager.activations_bytes == 32 * (34 * SBH + 5 * 32 * 2048 * 2048)


def test_unknown_method_is_user_error():
    with pytest.raises(UserError, match="full, full_bf16, lora, qlora"):
        estimate_memory(load_shape("Llama-3.1-8B"), 0, "adafactor", 2048)


@pytest.mark.parametrize("model", ["Llama-3.1-8B", "Qwen3-32B", "Qwen3-235B-A22B"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_fit_is_the_fewest_gpus_and_largest_micro_batch(model, method):
    shape, gpu = load_shape(model), get_gpu("H100")
    fit = fit_hardware(shape, 10**7, method, gpu, 2048, 32)
    n, b, ckpt = fit.num_gpus, fit.max_micro_batch, fit.gradient_checkpointing

    def total(b, n, ckpt):
        return estimate_memory(shape, 10**7, method, 2048, b, n, ckpt).total_bytes

    assert total(b, n, ckpt) <= gpu.memory_bytes
    if b < 32 // n:
        assert total(b + 1, n, ckpt) > gpu.memory_bytes
    if n > 1:
        assert total(1, n // 2, True) > gpu.memory_bytes
    assert fit.micro_batch <= b and (32 // n) % fit.micro_batch == 0
    assert fit.effective_batch == fit.grad_accum_steps * fit.micro_batch * n == max(32, n)


def test_llama_8b_lora_fits_one_h100_fullft_does_not():
    shape, gpu = load_shape("Llama-3.1-8B"), get_gpu("H100")
    assert fit_hardware(shape, 10**7, "lora", gpu, 2048, 32).num_gpus == 1
    assert fit_hardware(shape, 10**7, "full", gpu, 2048, 32).num_gpus > 1
    assert fit_hardware(shape, 10**7, "full", gpu, 2048, 32, num_gpus=1).num_gpus is None
