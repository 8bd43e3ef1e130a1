"""Will the adapter hold the dataset? Capacity bits against the dataset's information bits.

Language models store about 2 bits per parameter (Allen-Zhu & Li 2024, "Physics of Language
Models: Part 3.3, Knowledge Capacity Scaling Laws"; >= 1 bit at fewer exposures). A dataset's
information is bounded above by its description length (DatasetProfile.information_bits), so
the verdict errs towards caution. Tinker's rule of thumb, LoRA parameters >= completion tokens,
is reported beside it (Thinking Machines, "LoRA Without Regret", 2025).

Verdict (capacity = adapter_params × bits_per_param):
    capacity >= 2 × dataset bits  -> "low-regret"    (room for the 1-2 bit/param uncertainty)
    capacity >= 1 × dataset bits  -> "borderline"    (fits only if the 2 bits/param prior holds)
    otherwise                      -> "capacity-constrained" (expect LoRA to fall behind FullFT)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_BITS_PER_PARAM = 2.0  # Allen-Zhu & Li 2024 (Physics of LMs 3.3)
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
    """

    adapter_params: int
    bits_per_param: float
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


def assess_capacity(
    params_at: Callable[[int], int],
    rank: int,
    max_rank: int,
    profile: Any,
    bits_per_param: float = DEFAULT_BITS_PER_PARAM,
) -> CapacityVerdict:
    """The verdict for the adapter `params_at(rank)` against a DatasetProfile.

    Args:
        params_at: adapter parameters at a rank (the target set and expert divisor fixed).
        rank: the planned rank.
        max_rank: the highest rank the exact search tries (the targeted matrices' full rank).
        profile: a `planner.profile.DatasetProfile` (reads `information_bits`,
            `information_method`, `completion_tokens`).
        bits_per_param: capacity per adapter parameter.
    """
    params = params_at(rank)
    capacity = params * bits_per_param
    data_bits = float(profile.information_bits)
    tokens = profile.completion_tokens
    needed = LOW_REGRET_RATIO * data_bits / bits_per_param
    return CapacityVerdict(
        adapter_params=params,
        bits_per_param=bits_per_param,
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
    )
