"""LoRA counts: hand arithmetic from DESIGN.md and peft's own trainable-parameter count."""

import functools

import pytest

from data.errors import UserError
from planner.lora import check_rank_fits, count_lora_params, count_run_lora, peft_target_kwargs
from planner.shapes import load_shape

LLAMA_8B = "meta-llama/Llama-3.1-8B"


# DESIGN.md: Llama-3.1-8B has 851,968 attention + 1,769,472 MLP adapter params per unit of rank.
@pytest.mark.parametrize(
    "targets, unembedding, per_rank",
    [
        ("attention", False, 851_968),
        ("mlp", False, 1_769_472),
        ("all", False, 2_621_440),
        ("all", True, 2_621_440 + 132_352),
        ("q_proj,v_proj", False, 32 * ((4096 + 4096) + (4096 + 1024))),
    ],
)
@pytest.mark.parametrize("rank", [1, 16, 128])
def test_llama_8b_hand_arithmetic(targets, unembedding, per_rank, rank):
    count = count_lora_params(load_shape(LLAMA_8B), rank, targets, target_unembedding=unembedding)
    assert count.total == per_rank * rank


def test_llama_8b_per_layer_and_roles():
    count = count_lora_params(load_shape(LLAMA_8B), 1)
    assert count.by_role == {"attention": 851_968, "mlp": 1_769_472}
    assert count.per_layer == {"dense": 2_621_440 // 32}


# Qwen3-235B-A22B: 94 layers, hidden 4096, 64 heads × 128, 4 KV heads, 128 experts (8 active),
# moe_intermediate 1536. Experts fused: gate_up (4096 → 3072), down (1536 → 4096).
@pytest.mark.parametrize(
    "divisor, expert_rank",
    [("active", 2), ("total", 1), ("none", 16)],
)
def test_qwen3_235b_expert_rank(divisor, expert_rank):
    count = count_lora_params(load_shape("Qwen3-235B-A22B"), 16, expert_rank_divisor=divisor)
    attention = 16 * 94 * ((4096 + 8192) + 2 * (4096 + 512) + (8192 + 4096))
    experts = expert_rank * 94 * 128 * ((4096 + 3072) + (1536 + 4096))
    assert count.expert_rank == expert_rank
    assert count.by_role == {"attention": attention, "routed_expert": experts}
    assert count.total == attention + experts


def test_deepseek_v3_mla_and_shared_experts():
    count = count_lora_params(load_shape("deepseek-ai/DeepSeek-V3"), 8, "all")
    # MLA per layer: q_a 7168→1536, q_b 1536→128·192, kv_a 7168→576, kv_b 512→128·256, o 128·128→7168
    mla = (7168 + 1536) + (1536 + 24576) + (7168 + 576) + (512 + 32768) + (16384 + 7168)
    assert count.by_role["attention"] == 8 * 61 * mla
    # peft re-targets gate/up/down_proj to the fused experts: the 3 dense MLPs and the shared experts
    # get no adapter (tests/trainer/test_planner_count.py builds the model and checks the count).
    assert "mlp" not in count.by_role and "shared_expert" not in count.by_role
    assert set(count.unadapted) == {"gate_proj", "up_proj", "down_proj", "shared_experts.gate_proj",
                                    "shared_experts.up_proj", "shared_experts.down_proj"}
    assert count.by_role["routed_expert"] == 1 * 58 * 256 * ((7168 + 4096) + (2048 + 7168))
    assert count.total == count.by_role["attention"] + count.by_role["routed_expert"]
    assert count.per_layer == {"dense": 8 * mla, "moe": 8 * mla + 1 * 256 * ((7168 + 4096) + (2048 + 7168))}


def test_all_linear_is_what_peft_builds_on_moe():
    """peft's all-linear on Qwen3-30B-A3B: experts at full rank, gate_up at 2r, the router adapted
    (tests/trainer/test_planner_count.py compares with peft itself)."""
    shape = load_shape("Qwen3-30B-A3B")
    count = count_lora_params(shape, 16, "all-linear")
    attention = 16 * 48 * ((2048 + 4096) + 2 * (2048 + 512) + (4096 + 2048))
    experts = 48 * 128 * (32 * (2048 + 1536) + 16 * (768 + 2048))
    router = 16 * 48 * (2048 + 128)
    assert count.total == attention + experts + router
    assert count_lora_params(load_shape(LLAMA_8B), 16, "all-linear").total == count_lora_params(
        load_shape(LLAMA_8B), 16).total


@pytest.mark.parametrize(
    "targets, message",
    [("gate", "never adapted"), ("embed_tokens", "never adapted"), ("wq", "No matrix named"), ("", "No target")],
)
def test_bad_targets_are_user_errors(targets, message):
    with pytest.raises(UserError, match=message):
        count_lora_params(load_shape("Qwen3-30B-A3B"), 4, targets)


@pytest.mark.parametrize("rank", [0, -1])
def test_bad_rank_is_user_error(rank):
    with pytest.raises(UserError, match="positive"):
        count_lora_params(load_shape(LLAMA_8B), rank)


def test_a_run_rank_must_fit_every_adapted_matrix():
    """The trainer's rule, in the planner: rank <= min(d_in, d_out) of each adapted matrix."""
    shape = load_shape("Llama-3.1-8B")  # k_proj and v_proj are 4096 -> 1024
    assert count_run_lora(shape, 1024).rank == 1024
    with pytest.raises(UserError, match=r"rank 1025 is larger than min\(d_in, d_out\) = 1024 of k_proj"):
        count_run_lora(shape, 1025)
    assert count_lora_params(shape, 4096).total > 0  # the capacity search counts any rank
    check_rank_fits([("q_proj", 64, 64, 64)])
    with pytest.raises(UserError, match="Choose rank <= 64"):
        check_rank_fits([("q_proj", 64, 64, 65)])


@functools.cache
def _tiny(arch):
    from transformers import AutoModelForCausalLM

    from tests.tiny import tiny_config

    config = tiny_config(arch, vocab_size=400)
    return config.to_dict(), AutoModelForCausalLM.from_config(config)


def _peft_trainable(arch, kwargs):
    import copy

    from peft import LoraConfig, get_peft_model

    _, model = _tiny(arch)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(lora_alpha=32, **kwargs))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return trainable


@pytest.mark.parametrize(
    "arch, targets, unembedding, divisor",
    [
        ("llama", "all", False, "active"),
        ("llama", "attention", False, "active"),
        ("llama", "mlp", False, "active"),
        ("llama", "q_proj,v_proj", False, "active"),
        ("qwen3", "all", False, "active"),
        ("qwen3", "attention", True, "active"),
        ("qwen3", "mlp", False, "active"),
        ("qwen3_moe", "all", False, "active"),
        ("qwen3_moe", "all", False, "total"),
        ("qwen3_moe", "all", False, "none"),
        ("qwen3_moe", "attention", False, "active"),
        ("qwen3_moe", "mlp", True, "active"),
        ("mixtral", "all", False, "active"),
        ("mixtral", "mlp", False, "none"),
    ],
)
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")  # peft applies them anyway
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_count_equals_peft_trainable(arch, targets, unembedding, divisor, rank):
    config, _ = _tiny(arch)
    count = count_lora_params(load_shape(config), rank, targets, divisor, target_unembedding=unembedding)
    assert count.total == _peft_trainable(arch, peft_target_kwargs(count))
