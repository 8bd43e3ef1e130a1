"""load_model: base, base + peft adapter, and a saved FullFT model give the logits they were saved with."""

import pytest

from data.errors import UserError


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tiny_models("llama")
    root = tmp_path_factory.mktemp("saved")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    torch.manual_seed(1)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=32, target_modules="all-linear"),
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft starts B at 0; make the adapter change the output
        lora.eval()
        lora_logits = lora(input_ids=ids).logits
    lora.save_pretrained(root / "adapter")
    full = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        full.model.layers[0].mlp.down_proj.weight.mul_(3.0)
        full_logits = full(input_ids=ids).logits
    full.save_pretrained(root / "model")
    return base_dir, root, ids, lora_logits, full_logits


def test_load_model_variants(saved):
    import torch

    from evaluation.nll import load_model

    base_dir, root, ids, lora_logits, full_logits = saved
    with torch.no_grad():
        base = load_model(str(base_dir), None, device="cpu")(input_ids=ids).logits
        lora = load_model(str(base_dir), str(root / "adapter"), device="cpu")(input_ids=ids).logits
        full = load_model(str(base_dir), str(root / "model"), device="cpu")(input_ids=ids).logits
    torch.testing.assert_close(lora, lora_logits)
    torch.testing.assert_close(full, full_logits)
    assert not torch.allclose(base, lora, atol=1e-3)
    assert not torch.allclose(base, full, atol=1e-3)


def test_load_model_rejects_a_dir_without_model(saved, tmp_path):
    from evaluation.nll import load_model

    with pytest.raises(UserError, match="neither a peft adapter"):
        load_model(str(saved[0]), str(tmp_path), device="cpu")
