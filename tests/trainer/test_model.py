"""LoRA targets: presets, expert ranks, trainable-parameter counts and refusals."""

import pytest
import torch

from data.errors import UserError
from tests.tiny import build_tokenizer, tiny_config
from trainer.model import apply_lora, count_trainable, resolve_targets


def _model(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, len(build_tokenizer())))


# Hand counts, r·(d_in + d_out) per matrix, 2 layers (tests/tiny.py: hidden 64, 4 heads of 16, 2 KV
# heads -> k/v out 32, intermediate 128; MoE: 4 experts, 2 active, moe_intermediate 32).
# Attention per layer: q 128 + k 96 + v 96 + o 128 = 448 per unit of rank; MLP: 3 x 192 = 576.
# MoE experts per layer: E x r_e x (gate_up (64 + 64) + down (32 + 64)) = 4 x 224 x r_e.
@pytest.mark.parametrize(
    "arch, targets, divisor, rank, expected",
    [
        ("llama", "all", "active", 4, 2 * (448 + 576) * 4),
        ("llama", "attention", "active", 4, 2 * 448 * 4),
        ("llama", "mlp", "active", 4, 2 * 576 * 4),
        ("llama", "q_proj,v_proj", "active", 4, 2 * (128 + 96) * 4),
        ("qwen3", "all", "active", 8, 2 * (448 + 576) * 8),
        ("qwen3_moe", "all", "active", 4, 2 * (448 * 4 + 4 * 224 * 2)),  # r_e = 4 // 2
        ("qwen3_moe", "all", "total", 4, 2 * (448 * 4 + 4 * 224 * 1)),  # r_e = 4 // 4
        ("qwen3_moe", "all", "none", 4, 2 * (448 * 4 + 4 * 224 * 4)),  # r_e = 4
        ("qwen3_moe", "all", "active", 1, 2 * (448 * 1 + 4 * 224 * 1)),  # r_e = max(1, 0)
        ("qwen3_moe", "mlp", "active", 4, 2 * 4 * 224 * 2),
    ],
)
def test_trainable_params_match_hand_count(arch, targets, divisor, rank, expected):
    model = _model(arch)
    plan = resolve_targets(model, rank, targets, divisor)
    peft_model = apply_lora(model, rank, 32, plan)
    assert count_trainable(peft_model) == expected


def test_router_and_unembedding_are_not_adapted_by_default():
    peft_model = apply_lora(_model("qwen3_moe"), 4, 32, resolve_targets(_model("qwen3_moe"), 4))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert not any(".mlp.gate." in n or "lm_head" in n for n in trainable)
    assert all("lora_" in n for n in trainable)


def test_target_unembedding_adds_the_output_layer():
    model = _model("llama")
    plain = resolve_targets(model, 4)
    with_head = resolve_targets(model, 4, target_unembedding=True)
    extra = {m[0]: m for m in with_head.matrices}.keys() - {m[0] for m in plain.matrices}
    assert extra == {"lm_head"}
    assert count_trainable(apply_lora(model, 4, 32, with_head)) == 8192 + 4 * (64 + 400)


def test_unknown_target_is_user_error():
    with pytest.raises(UserError, match="Unknown LoRA target.*qq_proj"):
        resolve_targets(_model("llama"), 4, "q_proj,qq_proj")


def test_output_layer_by_name_points_to_target_unembedding():
    with pytest.raises(UserError, match="target_unembedding"):
        resolve_targets(_model("llama"), 4, "lm_head")


def test_rank_above_a_targeted_matrix_is_user_error():
    model = _model("llama")
    resolve_targets(model, 32)  # k_proj is 32 x 64: rank 32 is the most it can take
    with pytest.raises(UserError, match="rank 33 is larger than min.*= 32 of .*k_proj"):
        resolve_targets(model, 33)
    resolve_targets(model, 33, "q_proj")  # 64 x 64 alone takes it


def test_unreachable_hub_model_is_user_error():
    from trainer.model import load_base_model

    with pytest.raises(UserError, match="Could not load model .*Hub cannot be reached"):
        load_base_model("lowregret-test/no-such-model")
