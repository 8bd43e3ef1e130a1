"""Capacity verdict thresholds and the smallest rank that fits."""

import math

import pytest

from planner.capacity import assess_capacity, classify, smallest_pow2_rank, smallest_rank
from planner.lora import count_lora_params
from planner.shapes import load_shape
from tests.planner.fakes import FakeProfile

LLAMA_PER_RANK = 2_621_440  # Llama-3.1-8B, all linear layers (DESIGN.md)


@pytest.mark.parametrize(
    "capacity, data, verdict",
    [(200, 100, "low-regret"), (199, 100, "borderline"), (100, 100, "borderline"),
     (99, 100, "capacity-constrained"), (1, 0, "low-regret")],
)
def test_classify(capacity, data, verdict):
    assert classify(capacity, data) == verdict


@pytest.mark.parametrize("needed, exact, pow2", [(1, 1, 1), (30, 3, 4), (1000, 100, 128), (5121, 513, None)])
def test_smallest_rank_linear(needed, exact, pow2):
    assert smallest_rank(lambda r: 10 * r, needed, 4096) == exact
    assert smallest_pow2_rank(lambda r: 10 * r, needed) == pow2


def test_no_rank_fits():
    assert smallest_rank(lambda r: r, 10**9, 4096) is None


@pytest.mark.parametrize(
    "data_bits, tokens, rank, verdict",
    [
        (10e6, 30e6, 4, "low-regret"),  # 4 × 2,621,440 × 2 bits = 20.97M >= 2 × 10M
        (10e6, 30e6, 2, "borderline"),  # 10.49M bits
        (10e6, 30e6, 1, "capacity-constrained"),  # 5.24M bits
    ],
)
def test_llama_8b_verdict(data_bits, tokens, rank, verdict):
    shape = load_shape("Llama-3.1-8B")

    def params_at(r):
        return count_lora_params(shape, r).total

    v = assess_capacity(params_at, rank, 4096, FakeProfile(data_bits, int(tokens)), bits_per_param=2.0)
    assert v.adapter_params == rank * LLAMA_PER_RANK
    assert v.capacity_bits == 2 * rank * LLAMA_PER_RANK
    assert v.verdict == verdict
    assert v.min_rank_exact == math.ceil(2 * data_bits / 2 / LLAMA_PER_RANK) == 4
    assert v.min_rank_pow2 == 4
    assert v.tinker_min_rank_exact == math.ceil(tokens / LLAMA_PER_RANK) == 12
    assert v.tinker_min_rank_pow2 == 16
    assert v.tinker_rule_holds is (rank * LLAMA_PER_RANK >= tokens)


def test_rl_example_from_design():
    # MATH: 10k problems × 32 samples × 1 bit ≈ 320k bits against a rank-1 Llama-3.1-8B LoRA.
    shape = load_shape("Llama-3.1-8B")
    v = assess_capacity(lambda r: count_lora_params(shape, r).total, 1, 4096, FakeProfile(320_000, 0), calibration={})
    assert v.verdict == "low-regret"
    assert v.capacity_over_data == pytest.approx(2 * LLAMA_PER_RANK / 320_000)
