"""GPU memory: hand arithmetic on Llama-3.1-8B, the peak's phases, sharding, and the fewest-GPUs search.

How close the estimate is to the trainer's measured step is benchmarks/memory_model.py's job
(tests/benchmarks/test_memory_model.py runs a subset of its grid).
"""

import pytest

from data.errors import UserError
from planner import memory
from planner.gpus import get_gpu
from planner.memory import estimate_memory, fit_hardware, layer_features, step_features
from planner.shapes import load_shape

PARAMS = 8_029_995_008
EMBED = 128_256 * 4_096  # embedding and (untied) lm_head each
ADAPTER = 10**7
LAYER = 4_096 * (4_096 + 1_024 + 1_024 + 4_096) + 3 * 4_096 * 14_336  # one decoder layer's matrices


@pytest.mark.parametrize(
    "method, weights, optimizer, grads",
    [
        ("full", 4 * PARAMS, 8 * PARAMS, 4 * PARAMS),
        ("full_bf16", 2 * PARAMS, 4 * PARAMS, 2 * PARAMS),  # torch's AdamW keeps bf16 state for bf16 weights
        ("lora", 2 * PARAMS + 4 * ADAPTER, 8 * ADAPTER, 4 * ADAPTER),
        ("qlora", 0.55 * (PARAMS - 2 * EMBED) + 2 * 2 * EMBED + 4 * ADAPTER, 8 * ADAPTER, 4 * ADAPTER),
    ],
)
@pytest.mark.parametrize("num_gpus", [1, 8])
def test_llama_8b_weights_optimizer_and_held_gradients(method, weights, optimizer, grads, num_gpus):
    shape = load_shape("Llama-3.1-8B")
    # With accumulation, the earlier micro-batches' gradients are held through every phase.
    m = estimate_memory(shape, ADAPTER, method, 2048, 1, num_gpus, grad_accum_steps=4)
    # FSDP2 (num_gpus > 1) also holds the all-gathered bf16 root (embedding, lm_head) and one layer,
    # and in the backward that layer's unsharded gradients (a whole layer for FullFT, the adapter's share for LoRA).
    gathered = 2 * (2 * EMBED + LAYER) if num_gpus > 1 and m.peak_phase != "end" else 0
    grad_bytes = {"full": 4, "full_bf16": 2}.get(method, 4)
    trained_layer = LAYER if method.startswith("full") else ADAPTER / 32
    layer_grads = trained_layer * grad_bytes if num_gpus > 1 and m.peak_phase in ("backward", "bottom") else 0
    assert m.weights_bytes == pytest.approx(weights / num_gpus + gathered)
    assert m.optimizer_bytes == pytest.approx(optimizer / num_gpus)
    assert m.grads_bytes == pytest.approx(grads / num_gpus + layer_grads)
    assert m.overhead_bytes == pytest.approx(1e9 + 0.05 * m.allocated_bytes)
    assert m.allocated_bytes == pytest.approx(m.weights_bytes + m.grads_bytes + m.optimizer_bytes
                                              + m.activations_bytes + m.temporaries_bytes)


def test_layer_features_of_llama_8b_by_hand():
    shape = load_shape("Llama-3.1-8B")
    f = layer_features(shape, "dense", 2048, 4)
    tokens = 4 * 2048
    assert f["hidden_tokens"] == tokens * 4096 and f["ffn_tokens"] == tokens * 14336
    assert f["q_tokens"] == tokens * 32 * 128 and "kv_tokens" not in f  # GQA's k, v are repeated to the q heads
    assert f["qk_norm_tokens"] == 0  # Llama has no q/k norm; Qwen3 has
    assert layer_features(load_shape("Qwen3-8B"), "dense", 2048, 4)["qk_norm_tokens"] == tokens * (4096 + 1024)
    assert f["params"] == 4096 * (4096 + 2 * 1024 + 4096) + 3 * 4096 * 14336 and f["expert_params"] == 0
    assert f["padding_mask"] == 4 * 2048 * 2048 and layer_features(shape, "dense", 2048, 1)["padding_mask"] == 0
    s = step_features(shape, 2048, 4, layer_activations=1.0)
    assert s["chunk_vocab"] == 4096 * 128_256  # the loss holds one chunk of 4096 positions' logits
    assert step_features(shape, 1024, 1, 1.0)["chunk_vocab"] == 1024 * 128_256


def test_moe_layer_features_count_routed_tokens_and_expert_weights():
    shape = load_shape("Qwen3-30B-A3B")
    f = layer_features(shape, "moe", 1024, 2)
    assert f["routed_hidden_tokens"] == 2048 * 8 * 2048 and f["routed_ffn_tokens"] == 2048 * 8 * 768
    assert f["expert_tokens"] == 2048 * 128 and f["ffn_tokens"] == 0
    assert f["expert_params"] == 128 * 3 * 2048 * 768


def test_peak_is_the_largest_phase():
    shape = load_shape("Llama-3.1-8B")
    m = estimate_memory(shape, ADAPTER, "lora", 2048, 4)
    measured = memory.MEASURED[("lora", False)]
    layer = sum(c * layer_features(shape, "dense", 2048, 4)[k] for k, c in measured.layer.items())
    assert m.activations_bytes == pytest.approx(32 * layer)
    assert m.peak_phase in memory.PHASES
    # Each phase alone is below the reported peak.
    steps = step_features(shape, 2048, 4, layer)
    for phase in memory.PHASES:
        rest = sum(c * steps[k] for k, c in measured.phases[phase].items())
        below = m.weights_bytes + m.optimizer_bytes + rest + (0 if phase == "end" else 32 * layer)
        assert below <= m.allocated_bytes * (1 + 1e-9)


def test_checkpointing_and_length_move_activations():
    shape = load_shape("Llama-3.1-8B")
    plain = estimate_memory(shape, ADAPTER, "lora", 4096, 2)
    ckpt = estimate_memory(shape, ADAPTER, "lora", 4096, 2, gradient_checkpointing=True)
    assert ckpt.allocated_bytes < plain.allocated_bytes
    assert estimate_memory(shape, ADAPTER, "lora", 1024, 2).allocated_bytes < plain.allocated_bytes


def test_fsdp_shards_persistent_state_gathers_a_layer_and_computes_in_bf16():
    shape = load_shape("Llama-3.1-8B")
    one = estimate_memory(shape, ADAPTER, "full", 2048, 1, 1, grad_accum_steps=2)
    eight = estimate_memory(shape, ADAPTER, "full", 2048, 1, 8, grad_accum_steps=2)
    assert eight.peak_phase in ("forward", "backward")
    assert eight.weights_bytes == pytest.approx(one.weights_bytes / 8 + 2 * (2 * EMBED + LAYER))
    assert eight.optimizer_bytes == pytest.approx(one.optimizer_bytes / 8)
    # FSDP2's MixedPrecisionPolicy computes in bf16: the saved activations are bf16 training's.
    bf16 = estimate_memory(shape, ADAPTER, "full_bf16", 2048, 1, 1, grad_accum_steps=2)
    assert eight.activations_bytes == bf16.activations_bytes < one.activations_bytes


def test_every_measured_constant_names_its_command():
    assert {(m, c) for m in ("full", "full_bf16", "lora") for c in (False, True)} <= set(memory.MEASURED)
    for step in memory.MEASURED.values():
        assert step.source == "measured: python benchmarks/memory_model.py --fit"
        assert set(step.phases) == set(memory.PHASES)
    for method in ("full", "full_bf16", "lora"):
        assert memory.METHODS[method].source.startswith("measured: python benchmarks/memory_model.py --fit")


def test_unknown_method_is_user_error():
    with pytest.raises(UserError, match="full, full_bf16, lora, qlora"):
        estimate_memory(load_shape("Llama-3.1-8B"), 0, "adafactor", 2048)


@pytest.mark.parametrize("model", ["Llama-3.1-8B", "Qwen3-32B", "Qwen3-235B-A22B"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_fit_is_the_fewest_gpus_and_largest_micro_batch(model, method):
    shape, gpu = load_shape(model), get_gpu("H100")
    fit = fit_hardware(shape, ADAPTER, method, gpu, 2048, 32)
    n, b, ckpt = fit.num_gpus, fit.max_micro_batch, fit.gradient_checkpointing

    def total(b, n, ckpt):
        return estimate_memory(shape, ADAPTER, method, 2048, b, n, ckpt, -(-32 // (b * n))).total_bytes

    assert total(b, n, ckpt) <= gpu.memory_bytes
    assert all(total(larger, n, ckpt) > gpu.memory_bytes for larger in range(b + 1, 32 // n + 1))
    if n > 1:
        assert all(total(mb, n // 2, True) > gpu.memory_bytes for mb in range(1, 32 // (n // 2) + 1))
    assert fit.micro_batch <= b and (32 // n) % fit.micro_batch == 0
    assert fit.effective_batch == fit.grad_accum_steps * fit.micro_batch * n == max(32, n)
    assert fit.total_bytes == pytest.approx(total(fit.micro_batch, n, ckpt))


def test_llama_8b_lora_fits_one_h100_fullft_does_not():
    shape, gpu = load_shape("Llama-3.1-8B"), get_gpu("H100")
    assert fit_hardware(shape, ADAPTER, "lora", gpu, 2048, 32).num_gpus == 1
    assert fit_hardware(shape, ADAPTER, "full", gpu, 2048, 32).num_gpus > 1
    assert fit_hardware(shape, ADAPTER, "full", gpu, 2048, 32, num_gpus=1).num_gpus is None
