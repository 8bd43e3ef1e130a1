"""Paired regret statistics: an interval for LoRA's regret and a PASS / FAIL / INCONCLUSIVE verdict.

Both methods are scored on the identical held-out examples. For example i with n_i completion
tokens and summed NLLs L_i (LoRA), F_i (FullFT), B_i (base model), in nats:

    regret    = Σ (L_i − F_i) / Σ n_i          (nats per completion token: the final-loss difference)
    recovered = Σ (B_i − L_i) / Σ (B_i − F_i)  (the share of FullFT's improvement LoRA achieved)

Held-out loss is a mean over examples, so its uncertainty is the spread over examples: the
interval is a paired bootstrap that resamples whole examples (not tokens) with their L, F, B and
n together (`scipy.stats.bootstrap`, `paired=True`, BCa, 10,000 resamples, fixed random state),
so the example-to-example variation shared by both methods cancels. It does not cover training
noise (seed, data order): only replicate runs measure that. With k seed replicates (LoRA seed s
paired with FullFT seed s, all scored on the same examples) the regret is the mean over seeds,
the bootstrap runs on the seed-averaged differences, and a t-interval of the k per-seed regrets
(half-width t_{k−1} · sd / √k) is added in quadrature: the two noise sources are independent.
DESIGN.md "Regret statistics"; docs/EVALUATION.md explains what the interval means.

Verdict against the allowed regret A: PASS when the whole interval is ≤ A, FAIL when it is
entirely above A, INCONCLUSIVE otherwise, with the number of held-out examples that would likely
decide it (the example part of the half-width shrinks as 1/√n; the seed part does not).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 10_000
PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"


@dataclass(frozen=True)
class RegretInterval:
    """Regret (nats per completion token) with its interval, and the fraction recovered."""

    regret_nats: float
    low: float
    high: float
    examples: int
    tokens: int
    seeds: int
    confidence: float
    example_half_widths: tuple[float, float]
    """(below, above) the regret: the part of the interval due to the choice of examples."""
    seed_half_width: float
    """The part due to training noise, from the per-seed regrets (0 with a single seed)."""
    seed_regrets: tuple[float, ...]
    full_seed_sd: float | None
    """Standard deviation of FullFT's held-out loss between seeds: the noise floor (None: 1 seed)."""
    recovered: float | None = None
    recovered_low: float | None = None
    recovered_high: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Verdict:
    """PASS / FAIL / INCONCLUSIVE against the allowed regret, and what would decide an INCONCLUSIVE."""

    label: str
    allowed_nats: float
    examples_needed: int | None = None
    """INCONCLUSIVE only: held-out examples that would likely decide it (None: more examples cannot)."""


def regret_interval(
    tokens_n,
    lora_k_n,
    full_k_n,
    base_n=None,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    random_state: int = 0,
) -> RegretInterval:
    """The regret and its paired-bootstrap interval (plus the seed part with replicates).

    Args:
        tokens_n: completion tokens of each held-out example.
        lora_k_n, full_k_n: summed NLL (nats) of each example, one row per seed (a 1-D array is one
            seed); row s of both comes from the runs with seed s.
        base_n: the base model's summed NLL of each example, for "recovered"; None skips it.
        confidence: of the interval.
        n_resamples, random_state: of the bootstrap (fixed, so a verdict is reproducible).

    Raises:
        ValueError: shapes disagree or there are no tokens.
    """
    tokens = np.asarray(tokens_n, dtype=np.float64)
    lora, full = np.atleast_2d(np.asarray(lora_k_n, float)), np.atleast_2d(np.asarray(full_k_n, float))
    if lora.shape != full.shape or lora.shape[1] != tokens.shape[0]:
        raise ValueError(f"shapes differ: tokens {tokens.shape}, LoRA {lora.shape}, FullFT {full.shape}")
    if tokens.sum() <= 0:
        raise ValueError("no completion tokens")
    seeds, examples = lora.shape
    seed_regrets = (lora - full).sum(axis=1) / tokens.sum()
    regret = float(seed_regrets.mean())
    low_ex, high_ex = _ratio_interval((lora - full).mean(axis=0), tokens, confidence, n_resamples, random_state)
    below, above = regret - low_ex, high_ex - regret

    seed_half, full_sd = 0.0, None
    if seeds > 1:
        from scipy import stats

        t = stats.t.ppf((1 + confidence) / 2, df=seeds - 1)
        seed_half = float(t * seed_regrets.std(ddof=1) / math.sqrt(seeds))
        full_sd = float((full.sum(axis=1) / tokens.sum()).std(ddof=1))

    recovered = recovered_low = recovered_high = None
    if base_n is not None:
        base = np.asarray(base_n, dtype=np.float64)
        gained_full, gained_lora = base - full.mean(axis=0), base - lora.mean(axis=0)
        if gained_full.sum() > 0:
            recovered = float(gained_lora.sum() / gained_full.sum())
            recovered_low, recovered_high = _ratio_interval(gained_lora, gained_full, confidence, n_resamples,
                                                            random_state)
    return RegretInterval(
        regret_nats=regret,
        low=regret - math.hypot(below, seed_half),
        high=regret + math.hypot(above, seed_half),
        examples=examples,
        tokens=int(tokens.sum()),
        seeds=seeds,
        confidence=confidence,
        example_half_widths=(below, above),
        seed_half_width=seed_half,
        seed_regrets=tuple(float(r) for r in seed_regrets),
        full_seed_sd=full_sd,
        recovered=recovered,
        recovered_low=recovered_low,
        recovered_high=recovered_high,
    )


def decide(interval: RegretInterval, allowed_nats: float) -> Verdict:
    """PASS if the interval is within `allowed_nats`, FAIL if entirely above, else INCONCLUSIVE.

    For INCONCLUSIVE, the examples that would likely decide it: with the regret where it is, the
    example part e of the half-width towards the threshold shrinks to e·√(n/n'); solve
    √(e²·n/n' + s²) = margin (s: the seed part) for n'. None when the margin is 0 or the seed part
    alone is wider than the margin (then more seeds, not more examples, are needed).
    """
    if interval.high <= allowed_nats:
        return Verdict(PASS, allowed_nats)
    if interval.low > allowed_nats:
        return Verdict(FAIL, allowed_nats)
    margin = abs(allowed_nats - interval.regret_nats)
    below, above = interval.example_half_widths
    side = above if interval.regret_nats <= allowed_nats else below
    seed = interval.seed_half_width
    needed = None
    if margin > seed and math.isfinite(side):
        needed = max(interval.examples + 1, math.ceil(interval.examples * side**2 / (margin**2 - seed**2)))
    return Verdict(INCONCLUSIVE, allowed_nats, needed)


def _ratio_interval(numerator_n, denominator_n, confidence, n_resamples, random_state) -> tuple[float, float]:
    """Bootstrap interval of Σ numerator / Σ denominator, resampling examples (paired), BCa.

    One example cannot show a spread: (−inf, inf). No spread at all (every term equal): the point.
    """
    from scipy import stats

    num, den = np.asarray(numerator_n, float), np.asarray(denominator_n, float)
    point = num.sum() / den.sum()
    if num.shape[0] < 2:
        return -math.inf, math.inf
    if np.ptp(num) == 0 and np.ptp(den) == 0:
        return float(point), float(point)

    def ratio(a, b, axis=-1):
        return a.sum(axis=axis) / b.sum(axis=axis)

    for method in ("BCa", "percentile"):  # BCa can fail on degenerate resamples: fall back
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = stats.bootstrap((num, den), ratio, paired=True, vectorized=True, confidence_level=confidence,
                                     n_resamples=n_resamples, method=method, random_state=random_state)
        low, high = result.confidence_interval
        if math.isfinite(low) and math.isfinite(high):
            return float(min(low, point)), float(max(high, point))
    return -math.inf, math.inf
