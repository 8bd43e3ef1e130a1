"""LR, alpha and batch-size advice: tinker-cookbook's numbers and the blog's thresholds."""

import pytest

from planner.advice import advise, batch_level
from planner.shapes import load_shape


@pytest.mark.parametrize(
    "model, expected",
    [
        ("Llama-3.1-8B", 5e-5 * 10 * (2000 / 4096) ** 0.781),
        ("Llama-3.2-1B", 5e-5 * 10 * (2000 / 2048) ** 0.781),
        ("Qwen3-8B", 5e-5 * 10 * (2000 / 4096) ** 0.0775),
        ("Qwen3-235B-A22B", 5e-5 * 10 * (2000 / 4096) ** 0.0775),
    ],
)
def test_tinker_formula(model, expected):
    a = advise(load_shape(model), 32)
    assert a.lora_lr == pytest.approx(expected)
    assert a.alpha == 32


@pytest.mark.parametrize("steps, lr, anecdotal", [(None, 2e-4, False), (1000, 2e-4, False), (100, 2e-4, False),
                                                   (99, 3e-4, True), (10, 3e-4, True)])
def test_fullft_multiplier(steps, lr, anecdotal):
    a = advise(load_shape("Mixtral-8x7B"), 32, fullft_lr=2e-5, steps=steps, calibration={})  # the priors
    assert a.lora_lr == pytest.approx(lr)
    assert a.anecdotal is anecdotal


def test_unknown_family_plans_without_an_lr_and_says_what_is_missing():
    a = advise(load_shape("Mixtral-8x7B"), 32)
    assert a.lora_lr is None and a.family is None
    assert "--fullft-lr" in a.messages[0] and "not computed" in a.messages[0]
    assert a.batch_level == "ok"  # the rest of the advice stands
    assert advise(load_shape("Mixtral-8x7B"), 32, fullft_lr=1e-5).lora_lr == pytest.approx(1e-4)


@pytest.mark.parametrize("batch, level", [(1, "ok"), (32, "ok"), (33, "small-penalty"), (128, "small-penalty"),
                                          (129, "strong-warning")])
def test_batch_levels(batch, level):
    assert batch_level(batch) == level
    assert advise(load_shape("Qwen3-8B"), batch).batch_level == level


def test_architecture_only_match_is_flagged():
    a = advise(load_shape("SmolLM2-135M"), 32)  # model_type llama, not a Llama checkpoint
    assert a.family == "llama" and any("only shares the architecture" in m for m in a.messages)
    assert not any("only shares" in m for m in advise(load_shape("Llama-3.1-8B"), 32).messages)


def test_lr_disagreement_names_both_lrs():
    from planner.advice import lr_disagreement

    advice = advise(load_shape("Llama-3.1-8B"), 4, fullft_lr=1.3e-4, steps=16, calibration={})  # 15 x 1.3e-4
    assert lr_disagreement(1.95e-3, advice) is None and lr_disagreement(2.0e-3, advice) is None
    warning = lr_disagreement(1.3e-3, advice)
    assert "configured LoRA LR 0.0013 is 0.67x the plan's advice 0.00195 (15 × the FullFT LR 0.00013)" in warning
