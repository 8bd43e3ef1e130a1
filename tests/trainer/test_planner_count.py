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


def _catalog_names():
    from planner.catalog import catalog_names

    return catalog_names()


def _meta_model(config: dict):
    from trainer.model import model_from_config

    with torch.device("meta"):
        return model_from_config(config, "bfloat16")


def _one_layer_per_kind(name: str) -> dict:
    from planner.catalog import catalog_config
    from planner.shapes import load_shape
    from trainer.memory import with_layers

    kinds = load_shape(name).layers_by_kind
    return with_layers(catalog_config(name), {kind: 1 for kind in kinds})


@pytest.mark.parametrize("name", _catalog_names())
@pytest.mark.parametrize("rank", [1, 16])
def test_catalog_layers_count_what_the_trainer_builds(name, rank):
    """One layer of each kind of every catalog model (the count is linear in the layers; the slow
    test below builds the whole models), built on the meta device with the trainer's own targets."""
    from planner.lora import count_lora_params
    from planner.shapes import load_shape

    config = _one_layer_per_kind(name)
    model = _meta_model(config)
    with torch.device("meta"):
        trained = count_trainable(apply_lora(model, rank, 32, resolve_targets(model, rank)))
    assert trained == count_lora_params(load_shape(config), rank).total


@pytest.mark.parametrize("name", _catalog_names())
@pytest.mark.parametrize("rank", [1, 16])
def test_all_linear_preset_counts_what_peft_all_linear_builds(name, rank):
    from peft import LoraConfig, get_peft_model

    from planner.lora import count_lora_params
    from planner.shapes import load_shape

    config = _one_layer_per_kind(name)
    with torch.device("meta"):
        model = get_peft_model(_meta_model(config), LoraConfig(r=rank, target_modules="all-linear"))
    assert count_trainable(model) == count_lora_params(load_shape(config), rank, "all-linear").total


def test_deepseek_dense_mlps_and_shared_experts_get_no_adapter():
    """peft re-targets gate/up/down_proj of DeepSeek-V3 to the fused experts; the plan says so."""
    from planner.lora import count_lora_params
    from planner.plan import build_plan
    from planner.shapes import load_shape

    count = count_lora_params(load_shape("DeepSeek-V3"), 16)
    assert {"gate_proj", "shared_experts.down_proj"} <= set(count.unadapted)
    assert "mlp" not in count.by_role and "shared_expert" not in count.by_role
    notes = " ".join(build_plan("DeepSeek-V3", 16).notes)
    assert "get no adapter" in notes and "all-linear" in notes


@pytest.mark.slow
@pytest.mark.parametrize("name", _catalog_names())
def test_whole_catalog_models_count_what_the_trainer_builds(name, rank=16):
    from planner.catalog import catalog_config
    from planner.lora import count_lora_params
    from planner.shapes import load_shape

    model = _meta_model(catalog_config(name))
    with torch.device("meta"):
        trained = count_trainable(apply_lora(model, rank, 32, resolve_targets(model, rank)))
    assert trained == count_lora_params(load_shape(name), rank).total
