"""The trainer's trainable-parameter count equals the planner's (planner.lora.count_lora_params)."""

import pytest
import torch

from tests.tiny import build_tokenizer, tiny_config
from trainer.model import apply_lora, count_trainable, resolve_targets


@pytest.mark.parametrize(
    "arch, targets, divisor, unembedding",
    [
        ("llama", "all", "active", False),
        ("llama", "attention", "active", False),
        ("llama", "mlp", "active", True),
        ("qwen3", "all", "active", False),
        ("qwen3", "all", "active", True),
        ("qwen3_moe", "all", "active", False),
        ("qwen3_moe", "all", "total", False),
        ("qwen3_moe", "mlp", "none", False),
    ],
)
def test_trainable_params_equal_the_planners_count(arch, targets, divisor, unembedding, rank=8):
    from transformers import AutoModelForCausalLM

    from planner.lora import count_lora_params
    from planner.shapes import load_shape

    config = tiny_config(arch, len(build_tokenizer()))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    plan = resolve_targets(model, rank, targets, divisor, unembedding)
    trained = count_trainable(apply_lora(model, rank, 32, plan))
    planned = count_lora_params(load_shape(config.to_dict()), rank, targets, divisor, unembedding)
    assert trained == planned.total


def test_expert_rank_floor_matches_the_planner():
    test_trainable_params_equal_the_planners_count("qwen3_moe", "all", "active", False, rank=1)  # 1 // 2 -> 1
