"""study.capacity: bits from losses, the two-regime bits-per-parameter fit, the measured knee."""

import math

import pytest

from study.capacity import (
    bits_absorbed,
    fit_bits_per_param,
    rose_above_start,
    smallest_matching_rank,
    within_factor,
)


def test_bits_from_losses_hand_computed():
    # 100 facts × 5 bits = 500 bits; 1200 completion tokens.
    a = bits_absorbed(base_loss=0.30, final_loss=0.05, completion_tokens=1200, information_bits=500.0)
    assert a.base_bits == pytest.approx(0.30 * 1200 / math.log(2))  # 519.4 bits
    assert a.final_bits == pytest.approx(0.05 * 1200 / math.log(2))  # 86.6 bits
    assert a.absorbed_bits == pytest.approx(0.25 * 1200 / math.log(2))
    assert a.stored_bits == pytest.approx(500 - 86.56, abs=0.01)
    assert a.stored_fraction == pytest.approx(a.stored_bits / 500)
    # A run whose loss stays above log2(choices) per fact stores nothing (not a negative amount).
    assert bits_absorbed(0.3, 0.5, 1200, 500.0).stored_bits == 0.0


def _points(b, sizes, ranks, per_rank=1000, noise=()):
    points = []
    for size, full_bits in sizes:
        for i, r in enumerate(ranks):
            params = r * per_rank
            bits = min(b * params, full_bits) * (noise[i % len(noise)] if noise else 1.0)
            points.append({"params": params, "bits": bits, "full_bits": full_bits, "size": size, "label": f"{size}-{r}"})
    return points


@pytest.mark.parametrize("b", [0.3, 1.0, 2.5])
def test_fit_recovers_a_known_bits_per_param(b):
    fit = fit_bits_per_param(_points(b, [(400, 2000.0), (800, 4000.0), (1600, 8000.0)], [1, 2, 4, 8, 16]))
    assert fit.bits_per_param == pytest.approx(b, rel=1e-3)
    assert fit.log_rmse < 1e-3
    # Saturated exactly where b·params < FullFT's bits.
    assert {p["label"] for p in fit.saturated} == {
        f"{s}-{r}" for s, fb in [(400, 2000.0), (800, 4000.0), (1600, 8000.0)] for r in [1, 2, 4, 8, 16]
        if b * r * 1000 < fb}
    assert fit.interval[0] == pytest.approx(b, rel=1e-3) and fit.interval[1] == pytest.approx(b, rel=1e-3)


def test_fit_with_noise_lands_near_the_truth_and_reports_the_spread():
    fit = fit_bits_per_param(_points(0.8, [(400, 2000.0), (1600, 8000.0)], [1, 2, 4, 8], noise=(0.9, 1.1, 1.0)))
    assert 0.7 < fit.bits_per_param < 0.9
    assert fit.interval[0] <= fit.interval[1]


def test_no_capacity_bound_run_means_no_fit():
    # Every rank stored everything FullFT stored: the data cannot tell b.
    points = [{"params": p, "bits": 1000.0, "full_bits": 1000.0, "size": 1, "label": str(p)} for p in (1e4, 2e4)]
    assert fit_bits_per_param(points) is None
    assert fit_bits_per_param([]) is None


@pytest.mark.parametrize("verdicts, rank", [
    ({1: False, 2: False, 4: True, 8: True}, 4),
    ({1: True, 2: True}, 1),
    ({1: False, 2: True, 4: False, 8: True}, 8),  # a later FAIL moves the knee past it
    ({1: False, 2: False}, None),
])
def test_smallest_matching_rank(verdicts, rank):
    assert smallest_matching_rank(verdicts) == rank


def _curve(*points: float, per: int = 20) -> list[float]:
    """A training curve that holds each of `points` for `per` steps."""
    return [p for p in points for _ in range(per)]


@pytest.mark.parametrize("losses, rose", [
    (_curve(1.4, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01), False),  # learns and settles
    (_curve(1.4, 0.7, 0.6, 0.5, 0.45, 0.42, 0.41, 0.42, 0.41, 0.40), False),  # noisy plateau below the start
    (_curve(1.4, 0.7, 2.3, 1.7, 1.6, 1.5, 1.4, 1.3, 1.3, 1.3), True),  # spikes past the start (the 1,024-fact r=16 run)
    (_curve(1.4, 1.5, 0.7, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1), True),  # rose above the start, then recovered
    ([1.4, 2.0, 0.1] * 6, None),  # 18 steps: under 2 per span
])
def test_rose_above_start(losses, rose):
    assert rose_above_start(losses) is rose


@pytest.mark.parametrize("predicted, measured, ok", [(4, 8, True), (4, 2, True), (2, 8, False), (16, 4, False),
                                                     (None, 4, None), (4, None, None)])
def test_within_factor(predicted, measured, ok):
    assert within_factor(predicted, measured) is ok


@pytest.mark.parametrize("vocab_size", [1024, 300])  # values one token each; values cut into pieces
def test_value_tokens_only_keeps_exactly_the_value(vocab_size):
    from data.builtin_datasets import facts_rows
    from data.dataset import IGNORE_INDEX
    from data.render import Renderer
    from study.capacity import value_tokens_only
    from study.facts_model import build_tokenizer

    tokenizer = build_tokenizer(vocab_size)
    for row in facts_rows(12, 32, seed=3):
        example = Renderer(tokenizer).example(row, "chat", 64)
        kept = value_tokens_only(example, tokenizer)
        assert kept.input_ids == example.input_ids
        value = row["messages"][1]["content"].rsplit(" is ", 1)[1].removesuffix(".")
        ids = [t for t, label in zip(kept.input_ids, kept.labels, strict=True) if label != IGNORE_INDEX]
        assert tokenizer.decode(ids) in (value, " " + value)  # a lone space token before it is no part of it
        assert all(k in (IGNORE_INDEX, e) for k, e in zip(kept.labels, example.labels, strict=True))  # a subset, not new labels
    with pytest.raises(ValueError, match="not a facts answer"):
        value_tokens_only(Renderer(tokenizer).example({"messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}, "chat", 64), tokenizer)
