"""Will the adapter hold the dataset? Capacity bits against the dataset's information bits.

Language models store about 2 bits per parameter (Allen-Zhu & Li 2024, "Physics of Language
Models: Part 3.3, Knowledge Capacity Scaling Laws"; >= 1 bit at fewer exposures). A dataset's
information is bounded above by its description length (DatasetProfile.information_bits), so
the verdict errs towards caution. Tinker's rule of thumb, LoRA parameters >= completion tokens,
is reported beside it (Thinking Machines, "LoRA Without Regret", 2025).

The bits per parameter the planner uses by default is the study's measurement when
planner/calibration.json holds one (`lowregret study`, docs/STUDY.md), else the prior above; the
verdict records which, and also gives the verdict and smallest rank under the prior.

Verdict (capacity = adapter_params × bits_per_param):
    capacity >= 2 × dataset bits  -> "low-regret"    (room for the 1-2 bit/param uncertainty)
    capacity >= 1 × dataset bits  -> "borderline"    (fits only if the 2 bits/param prior holds)
    otherwise                      -> "capacity-constrained" (expect LoRA to fall behind FullFT)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from planner import calibration as calibration_mod

PRIOR_BITS_PER_PARAM = 2.0  # Allen-Zhu & Li 2024 (Physics of LMs 3.3)
PRIOR_BITS_PER_PARAM_SOURCE = "Allen-Zhu & Li 2024, Physics of LMs 3.3 (>= 1 bit at fewer exposures)"
LOW_REGRET_RATIO = 2.0  # capacity / dataset bits at or above which the verdict is low-regret
BORDERLINE_RATIO = 1.0  # ... at or above which it is borderline
POW2_RANKS = tuple(2**i for i in range(10))  # 1, 2, 4, ..., 512
VERDICTS = ("low-regret", "borderline", "capacity-constrained")


@dataclass(frozen=True)
class CapacityVerdict:
    """The adapter's capacity against the dataset, and the smallest ranks that fit.

    Attributes:
        capacity_bits: adapter_params × bits_per_param.
        dataset_bits: the profile's information bits (`information_method` says how measured).
        capacity_over_data: capacity_bits / dataset_bits.
        min_rank_pow2, min_rank_exact: smallest rank (power of two up to 512; any integer up to the
            matrices' full rank) whose capacity reaches LOW_REGRET_RATIO × dataset bits; None if none.
        tinker_rule_holds: adapter_params >= completion_tokens; `tinker_min_rank_*` as above for it.
            All None for RL profiles, which count no completion tokens.
        bits_per_param_source: where `bits_per_param` comes from (study measurement, prior, or given).
        prior_bits_per_param, prior_verdict, prior_min_rank_pow2: the same under the literature prior,
            so a plan shows both.
    """

    adapter_params: int
    bits_per_param: float
    bits_per_param_source: str
    capacity_bits: float
    dataset_bits: float
    information_method: str
    capacity_over_data: float | None
    verdict: str
    low_regret_ratio: float
    borderline_ratio: float
    min_rank_pow2: int | None
    min_rank_exact: int | None
    completion_tokens: int | None
    tinker_rule_holds: bool | None
    tinker_min_rank_pow2: int | None
    tinker_min_rank_exact: int | None
    prior_bits_per_param: float
    prior_verdict: str
    prior_min_rank_pow2: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def classify(capacity_bits: float, dataset_bits: float) -> str:
    """`low-regret`, `borderline` or `capacity-constrained` by the ratios above."""
    if capacity_bits >= LOW_REGRET_RATIO * dataset_bits:
        return "low-regret"
    if capacity_bits >= BORDERLINE_RATIO * dataset_bits:
        return "borderline"
    return "capacity-constrained"


def smallest_rank(params_at: Callable[[int], int], needed_params: float, max_rank: int) -> int | None:
    """The smallest rank in 1..max_rank with params_at(rank) >= needed_params (monotone in rank)."""
    if params_at(max_rank) < needed_params:
        return None
    lo, hi = 1, max_rank
    while lo < hi:
        mid = (lo + hi) // 2
        if params_at(mid) >= needed_params:
            hi = mid
        else:
            lo = mid + 1
    return lo


def smallest_pow2_rank(params_at: Callable[[int], int], needed_params: float) -> int | None:
    return next((r for r in POW2_RANKS if params_at(r) >= needed_params), None)


def bits_per_param_constant(calibration: dict | None = None) -> calibration_mod.Constant:
    """The adapter capacity per parameter to use by default: the study's measurement when the
    calibration file has one, else PRIOR_BITS_PER_PARAM (`calibration`: see
    `planner.calibration.constant`; {} forces the prior)."""
    return calibration_mod.constant("bits_per_param", PRIOR_BITS_PER_PARAM, PRIOR_BITS_PER_PARAM_SOURCE, calibration)


def assess_capacity(
    params_at: Callable[[int], int],
    rank: int,
    max_rank: int,
    profile: Any,
    bits_per_param: float | None = None,
    calibration: dict | None = None,
    bits_per_param_source: str = "given by the caller (--bits-per-param)",
) -> CapacityVerdict:
    """The verdict for the adapter `params_at(rank)` against a DatasetProfile.

    Args:
        params_at: adapter parameters at a rank (the target set and expert divisor fixed).
        rank: the planned rank.
        max_rank: the highest rank the exact search tries (the targeted matrices' full rank).
        profile: a `planner.profile.DatasetProfile` (reads `information_bits`,
            `information_method`, `completion_tokens`).
        bits_per_param: capacity per adapter parameter; None: `bits_per_param_constant(calibration)`.
        calibration: a calibration record (None: the packaged file; {}: priors only).
        bits_per_param_source: where a given `bits_per_param` comes from, for the record.
    """
    source = bits_per_param_source
    if bits_per_param is None:
        chosen = bits_per_param_constant(calibration)
        bits_per_param, source = chosen.value, chosen.source
    params = params_at(rank)
    capacity = params * bits_per_param
    data_bits = float(profile.information_bits)
    tokens = profile.completion_tokens
    needed = LOW_REGRET_RATIO * data_bits / bits_per_param
    return CapacityVerdict(
        adapter_params=params,
        bits_per_param=bits_per_param,
        bits_per_param_source=source,
        capacity_bits=capacity,
        dataset_bits=data_bits,
        information_method=str(profile.information_method),
        capacity_over_data=capacity / data_bits if data_bits > 0 else None,
        verdict=classify(capacity, data_bits),
        low_regret_ratio=LOW_REGRET_RATIO,
        borderline_ratio=BORDERLINE_RATIO,
        min_rank_pow2=smallest_pow2_rank(params_at, needed),
        min_rank_exact=smallest_rank(params_at, needed, max_rank),
        completion_tokens=tokens,
        tinker_rule_holds=None if tokens is None else params >= tokens,
        tinker_min_rank_pow2=None if tokens is None else smallest_pow2_rank(params_at, tokens),
        tinker_min_rank_exact=None if tokens is None else smallest_rank(params_at, tokens, max_rank),
        prior_bits_per_param=PRIOR_BITS_PER_PARAM,
        prior_verdict=classify(params * PRIOR_BITS_PER_PARAM, data_bits),
        prior_min_rank_pow2=smallest_pow2_rank(params_at, LOW_REGRET_RATIO * data_bits / PRIOR_BITS_PER_PARAM),
    )
