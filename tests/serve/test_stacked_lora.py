"""serving.stacked_lora: a mixed batch through the stacked LoRA weights gives each row what peft's
own mixed-batch path gives it, follows the adapters in the model, and refuses what it cannot do."""

from __future__ import annotations

import pytest

from trainer.generation import BASE_ADAPTER

ROWS = ["r2", BASE_ADAPTER, "r16", "r8", "r16", "r2"]  # three ranks and the base, repeated, unordered


def _random_adapter(base_dir, out, rank: int, seed: int, **lora_kwargs):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=rank, lora_alpha=16, target_modules="all-linear", **lora_kwargs))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero, so every adapter changes every layer's output
            torch.nn.init.normal_(param, std=0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mixed_model(base_dir, tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("stacked")
    dirs = {f"r{r}": _random_adapter(base_dir, root / f"r{r}", r, seed=r) for r in (2, 8, 16)}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), dirs["r2"], adapter_name="r2")
    for name in ("r8", "r16"):
        model.load_adapter(dirs[name], adapter_name=name)
    return model.eval(), dirs, root


def _logits(model, ids, names, stacked=None):
    import torch

    with torch.inference_mode():
        if stacked is None:
            return model(input_ids=ids, adapter_names=names).logits
        with stacked.rows(model, names, BASE_ADAPTER):
            return model(input_ids=ids).logits


def test_each_row_gets_its_own_adapter_as_peft_computes_it(mixed_model):
    import torch

    from serving.stacked_lora import StackedLoRA

    model, _, _ = mixed_model
    ids = torch.randint(0, 100, (len(ROWS), 10), generator=torch.Generator().manual_seed(0))
    stacked = StackedLoRA()
    assert stacked.supports(model)
    reference = _logits(model, ids, ROWS)
    got = _logits(model, ids, ROWS, stacked)
    assert torch.allclose(got, reference, atol=1e-5, rtol=0), (got - reference).abs().max()
    base = _logits(model, ids, [BASE_ADAPTER] * len(ROWS))
    assert (got[0] - base[0]).abs().max() > 1e-2  # the adapters matter, so equality above means something
    assert torch.equal(got[1], base[1])  # a base row gets exact zeros added
    assert torch.equal(_logits(model, ids, ROWS), reference)  # after the context: hooks gone, peft's LoRA back on


def test_the_stacks_follow_the_adapters_in_the_model(mixed_model, base_dir):
    import torch

    from serving.stacked_lora import StackedLoRA

    model, _, root = mixed_model
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(1))
    stacked = StackedLoRA()
    _logits(model, ids, ["r2", "r8", BASE_ADAPTER], stacked)
    model.delete_adapter("r8")  # evicted, then another adapter under a reused name
    model.load_adapter(_random_adapter(base_dir, root / "r8-new", 4, seed=99), adapter_name="r8")
    names = ["r8", "r2", "r16"]
    assert torch.allclose(_logits(model, ids, names, stacked), _logits(model, ids, names), atol=1e-5, rtol=0)


def test_anything_but_plain_lora_on_linear_layers_keeps_peft_s_path(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from serving.stacked_lora import StackedLoRA

    dora = _random_adapter(base_dir, tmp_path / "dora", 4, seed=0, use_dora=True)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), dora)
    assert not StackedLoRA.supports(model)
    assert not StackedLoRA.supports(AutoModelForCausalLM.from_pretrained(base_dir))  # no LoRA at all
