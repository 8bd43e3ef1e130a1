"""The memory harness: the trainer's own step on fake tensors under MemTracker, extrapolated in depth."""

import pytest

from data.errors import UserError
from trainer import memory

# A small Llama-shaped config: fake tensors cost the same whatever the sizes, so this is for clarity.
LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": False}


def _params(config):
    from planner.shapes import shape_from_config

    return shape_from_config(config).total_params


def test_lora_state_bytes_are_the_models_own():
    m = memory.measure_step_memory(LLAMA, "lora", seq_len=64, micro_batch=2, rank=4)
    end = {p.phase: p for p in m.phases}["optimizer"].components
    from planner.lora import count_lora_params
    from planner.shapes import shape_from_config

    adapter = count_lora_params(shape_from_config(LLAMA), 4).total
    norms = 256 * (2 * 4 + 1)  # RMSNorm weights, left out of the planner's counts
    assert end["weights"] == pytest.approx(2 * (_params(LLAMA) + norms) + 4 * adapter, rel=0.02)
    assert end["optimizer"] == pytest.approx(8 * adapter, rel=0.05)  # fp32 Adam m, v (+ step counters)
    assert end["gradients"] == pytest.approx(4 * adapter, rel=0.02)
    assert m.peak_bytes == max(p.total_bytes for p in m.phases)


def test_full_bf16_adam_state_is_bf16():
    """torch's AdamW keeps m and v in the parameter's dtype: 4 bytes per bf16 parameter, not 8."""
    m = memory.measure_step_memory(LLAMA, "full_bf16", seq_len=64)
    end = {p.phase: p for p in m.phases}["optimizer"].components
    assert end["optimizer"] == pytest.approx(2 * end["weights"], rel=0.02)
    assert end["gradients"] == pytest.approx(end["weights"], rel=0.02)


def test_extrapolated_depth_equals_the_measured_depth():
    """Measuring 2 and 3 layers and extrapolating per phase gives the 4-layer step's peak."""
    direct = memory.measure_step_memory(LLAMA, "lora", seq_len=128, micro_batch=2)
    extrapolated = memory.measure_peak_memory({**LLAMA, "num_hidden_layers": 4}, "lora", seq_len=128, micro_batch=2)
    assert extrapolated.measured_layers == ({"dense": 2}, {"dense": 3})
    assert extrapolated.peak_bytes == pytest.approx(direct.peak_bytes, rel=0.01)
    assert extrapolated.peak_phase == direct.peak_phase


def test_checkpointing_keeps_less():
    plain = memory.measure_step_memory(LLAMA, "lora", seq_len=256, micro_batch=4)
    ckpt = memory.measure_step_memory(LLAMA, "lora", seq_len=256, micro_batch=4, gradient_checkpointing=True)
    assert ckpt.peak_bytes < plain.peak_bytes


def test_runs_the_trainers_micro_batch_step(monkeypatch):
    """The harness calls trainer.loss.train_micro_batch: a change to the loop's loss path is measured."""
    import trainer.loss

    calls = []
    original = trainer.loss.train_micro_batch

    def spy(*args, **kwargs):
        calls.append(kwargs.get("head"))
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer.loss, "train_micro_batch", spy)
    memory.measure_step_memory(LLAMA, "lora", seq_len=32)
    assert len(calls) == 1 and calls[0] is not None  # llama: the chunked loss head


def test_accumulation_holds_gradients_through_the_forward():
    one = memory.measure_step_memory(LLAMA, "full_bf16", seq_len=64)
    two = memory.measure_step_memory(LLAMA, "full_bf16", seq_len=64, grad_accum_steps=2)
    fw_one, fw_two = ({p.phase: p for p in m.phases}["forward"] for m in (one, two))
    assert fw_two.components["gradients"] == pytest.approx(fw_one.components["weights"], rel=0.02)
    assert fw_one.components["gradients"] == 0


def test_moe_layer_counts_are_placed_for_each_family():
    from planner.catalog import catalog_config
    from planner.shapes import shape_from_config

    for name, layers in (("DeepSeek-V3", {"dense": 1, "moe": 2}), ("Qwen3-30B-A3B", {"dense": 1, "moe": 1}),
                         ("Mixtral-8x7B", {"moe": 2})):
        assert shape_from_config(memory.with_layers(catalog_config(name), layers)).layers_by_kind == layers


@pytest.mark.parametrize("method", ["qlora", "adamw"])
def test_methods_the_trainer_has_no_path_for_are_user_errors(method):
    with pytest.raises(UserError, match="Cannot measure"):
        memory.measure_step_memory(LLAMA, method, seq_len=32)


def test_leaves_accelerate_ready_for_a_cpu_run():
    from accelerate import Accelerator

    memory.measure_step_memory(LLAMA, "lora", seq_len=32)  # bf16 autocast inside
    assert Accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"


def test_one_fsdp_rank_holds_its_shards_and_the_gathered_layers():
    """Rank 0 of 4 under the fake process group: weights, gradients and AdamW state are a quarter of
    one process's, plus what FSDP2 all-gathers; the fake world is torn down after the measurement."""
    import torch.distributed as dist

    from planner.shapes import load_config
    from trainer.memory import measure_step_memory, with_layers

    config = with_layers(load_config("Llama-3.2-1B"), {"dense": 2})
    one = measure_step_memory(config, "full", seq_len=256, micro_batch=1)
    four = measure_step_memory(config, "full", seq_len=256, micro_batch=1, world_size=4)
    assert (one.world_size, four.world_size) == (1, 4) and not dist.is_initialized()
    optimizer = {p.phase: p.components["optimizer"] for p in four.phases}["optimizer"]
    assert optimizer == pytest.approx(one.components["optimizer"] / 4, rel=0.01)
    assert four.peak_bytes < one.peak_bytes
    assert four.components["weights"] > one.components["weights"] / 4  # the all-gathered root and layers
