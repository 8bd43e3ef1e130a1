"""The paired regret interval and the three-way verdict, on constructed per-example losses whose
answers are known by hand."""

import math

import numpy as np
import pytest

from evaluation.regret import FAIL, INCONCLUSIVE, PASS, decide, regret_interval

N, TOKENS = 400, 10
FULL = np.full(N, 20.0)  # FullFT: 2.0 nats/token on every example


def _alternating(mean, spread):
    """Per-example NLL differences mean ± spread, alternating: regret = mean / TOKENS per token exactly,
    per-token standard deviation spread / TOKENS, so the 95% half-width is ~1.96·spread/TOKENS/√N."""
    return np.where(np.arange(N) % 2 == 0, mean + spread, mean - spread)


def test_pass_when_the_whole_interval_is_within_the_allowed_regret():
    interval = regret_interval(np.full(N, TOKENS), FULL + _alternating(0.0, 0.1), FULL)
    assert interval.regret_nats == pytest.approx(0.0, abs=1e-12)
    half = 1.96 * 0.1 / TOKENS / math.sqrt(N)  # 0.00098
    assert interval.low == pytest.approx(-half, rel=0.1) and interval.high == pytest.approx(half, rel=0.1)
    assert (interval.examples, interval.tokens, interval.seeds) == (N, N * TOKENS, 1)
    assert decide(interval, allowed_nats=0.01).label == PASS


def test_fail_when_the_whole_interval_is_above():
    interval = regret_interval(np.full(N, TOKENS), FULL + _alternating(1.0, 0.1), FULL)
    assert interval.regret_nats == pytest.approx(0.1)
    assert interval.low > 0.098 and interval.high < 0.102
    assert decide(interval, allowed_nats=0.01).label == FAIL


def test_inconclusive_says_how_many_examples_would_decide():
    # regret 0.01 ± ~0.0098; allowed 0.015: margin 0.005, so ~N·(0.0098/0.005)² ≈ 1,540 examples.
    interval = regret_interval(np.full(N, TOKENS), FULL + _alternating(0.1, 1.0), FULL)
    verdict = decide(interval, allowed_nats=0.015)
    assert verdict.label == INCONCLUSIVE
    _, above = interval.example_half_widths
    assert verdict.examples_needed == pytest.approx(N * above**2 / 0.005**2, abs=1.5)
    assert 1400 < verdict.examples_needed < 1800
    # On the threshold exactly, no number of examples decides it.
    assert decide(interval, allowed_nats=interval.regret_nats).examples_needed is None


def test_a_single_example_cannot_decide():
    interval = regret_interval([5], [1.0], [2.0])
    assert interval.low == -math.inf and interval.high == math.inf
    assert decide(interval, allowed_nats=0.01).label == INCONCLUSIVE


def test_seed_replicates_add_the_seed_spread_and_report_the_noise_floor():
    tokens = np.full(N, TOKENS)
    # Three seeds, per-seed regrets 0.00, 0.01, 0.02 (same examples, no example-to-example spread).
    lora = np.stack([FULL + TOKENS * r for r in (0.00, 0.01, 0.02)])
    full = np.stack([FULL, FULL + TOKENS * 0.004, FULL - TOKENS * 0.004]) + np.stack([np.zeros(N)] * 3)
    lora = lora + (full - FULL)  # LoRA seed s carries FullFT seed s's offset: regrets stay 0, .01, .02
    interval = regret_interval(tokens, lora, full)
    assert interval.seed_regrets == pytest.approx((0.0, 0.01, 0.02))
    assert interval.regret_nats == pytest.approx(0.01)
    # t(0.975, 2) = 4.303; sd of (0, .01, .02) = 0.01; half-width 4.303 · 0.01 / √3
    assert interval.seed_half_width == pytest.approx(4.3027 * 0.01 / math.sqrt(3), rel=1e-3)
    assert interval.example_half_widths == pytest.approx((0.0, 0.0), abs=1e-12)
    assert interval.high == pytest.approx(0.01 + interval.seed_half_width, abs=1e-12)
    assert interval.full_seed_sd == pytest.approx(0.004)  # FullFT losses 2.000, 2.004, 1.996
    # The margin to 0.02 is smaller than the seed part: more seeds, not more examples.
    assert decide(interval, allowed_nats=0.02).examples_needed is None


def test_recovered_fraction_by_hand():
    tokens = np.full(N, TOKENS)
    base = FULL + 10.0  # base 3.0 nats/token, FullFT 2.0
    lora = FULL + _alternating(2.5, 0.5)  # LoRA 2.25 nats/token: recovered (3 - 2.25) / (3 - 2) = 0.75
    interval = regret_interval(tokens, lora, FULL, base)
    assert interval.recovered == pytest.approx(0.75)
    assert interval.recovered_low < 0.75 < interval.recovered_high
    assert interval.recovered_high - interval.recovered_low < 0.02
    assert regret_interval(tokens, lora, FULL, FULL - 1.0).recovered is None  # FullFT worse than base


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="shapes"):
        regret_interval([1, 2], [1.0], [1.0, 2.0])
