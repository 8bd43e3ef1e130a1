"""Capacity from runs: bits a run absorbed, where each rank falls off FullFT, bits per parameter.

A facts run is scored on its own training facts (eval_dataset = dataset, every fact), so its
held-out loss is a memorisation loss; losses × completion tokens / ln 2 are summed code lengths of
the answers in bits. Two measures:

- absorbed = base bits − final bits: how much shorter the answers' code got (the issue's "base
  loss − final loss"). It also counts whatever of the answer template the base had not learnt.
- stored = n_facts · log2(choices) − final bits, at least 0: a lower bound on what the model knows
  about the values. The values are uniform and independent, so a model that knows nothing about
  them pays at least log2(choices) bits per fact; every bit below that total is information about
  the facts (the template's residual loss only makes the bound more conservative). This is
  Allen-Zhu & Li's capacity measure, and the one fitted below.

An adapter with fewer bits of capacity than the data saturates: stored ≈ bits_per_param × adapter
params. With more, it stores what FullFT stores. So bits_r = min(b · P_r, B_full) over the runs of
all sizes, fitted for b (least squares on log bits). That b is what `planner/calibration.json` holds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

LN2 = math.log(2)


@dataclass(frozen=True)
class Absorbed:
    """What one memorisation run took in, in bits (see the module docstring)."""

    base_loss: float
    final_loss: float
    completion_tokens: int
    information_bits: float
    base_bits: float
    final_bits: float
    absorbed_bits: float
    stored_bits: float

    @property
    def stored_fraction(self) -> float:
        return self.stored_bits / self.information_bits

    def to_dict(self) -> dict:
        return asdict(self) | {"stored_fraction": self.stored_fraction}


def bits_absorbed(base_loss: float, final_loss: float, completion_tokens: int, information_bits: float) -> Absorbed:
    """Both measures of the module docstring from a run's losses (nats per completion token)."""
    base_bits, final_bits = base_loss * completion_tokens / LN2, final_loss * completion_tokens / LN2
    return Absorbed(base_loss, final_loss, completion_tokens, information_bits, base_bits, final_bits,
                    base_bits - final_bits, max(0.0, information_bits - final_bits))


@dataclass(frozen=True)
class BitsPerParamFit:
    """bits_r = min(b · params_r, full_bits) fitted over LoRA runs.

    Attributes:
        bits_per_param: the fitted b.
        log_rmse: root-mean-square residual of log(bits) (how well the two-regime model fits).
        saturated: the runs the fit says are capacity-bound (b · params < FullFT's bits), with each
            run's own bits / params.
        runs: every point used (params, bits, full_bits, label).
        interval: (low, high): the range of b over leave-one-size-out refits (how much b depends on
            which dataset sizes are in the fit); None with a single size.
    """

    bits_per_param: float
    log_rmse: float
    saturated: tuple[dict, ...]
    runs: tuple[dict, ...]
    interval: tuple[float, float] | None

    def to_dict(self) -> dict:
        return asdict(self)


def _fit_b(points: list[dict]) -> tuple[float, float]:
    """Least squares on log bits of min(b · params, full_bits); b searched on a log grid, refined."""
    from scipy.optimize import minimize_scalar

    def loss(log_b: float) -> float:
        b = math.exp(log_b)
        return sum((math.log(max(p["bits"], 1e-9)) - math.log(min(b * p["params"], p["full_bits"]))) ** 2
                   for p in points)

    grid = [math.log(10 ** (k / 20)) for k in range(-80, 41)]  # 1e-4 .. 1e2 bits/param
    start = min(grid, key=loss)
    best = minimize_scalar(loss, bounds=(start - 0.2, start + 0.2), method="bounded")
    return math.exp(best.x), math.sqrt(best.fun / len(points))


def fit_bits_per_param(points: list[dict]) -> BitsPerParamFit | None:
    """Fit b from LoRA runs: dicts with params, bits, full_bits (FullFT's bits at that size), size, label.

    Runs that absorbed nothing (bits <= 0) are dropped: a log has no place for them and they say
    the run did not train, not how much an adapter holds. Returns None when no run is
    capacity-bound at any b, i.e. when the data cannot tell b (every rank matched FullFT).
    """
    points = [p for p in points if p["bits"] > 0 and p["full_bits"] > 0]
    if not points:
        return None
    b, rmse = _fit_b(points)
    saturated = tuple(p | {"bits_per_param": p["bits"] / p["params"]} for p in points if b * p["params"] < p["full_bits"])
    if not saturated:
        return None
    sizes = sorted({p["size"] for p in points})
    interval = None
    if len(sizes) > 1:
        refits = []
        for left_out in sizes:
            rest = [p for p in points if p["size"] != left_out]
            if any(b * p["params"] < p["full_bits"] for p in rest):
                refits.append(_fit_b(rest)[0])
        interval = (min(refits), max(refits)) if refits else None
    return BitsPerParamFit(b, rmse, saturated, tuple(points), interval)


def smallest_matching_rank(verdicts: dict[int, bool]) -> int | None:
    """The smallest rank from which every larger rank in the grid matches FullFT (None: none does)."""
    ranks = sorted(verdicts)
    for i, rank in enumerate(ranks):
        if all(verdicts[r] for r in ranks[i:]):
            return rank
    return None


def within_factor(predicted: int | None, measured: int | None, factor: float = 2.0) -> bool | None:
    """predicted / measured within [1/factor, factor]; None when either is unknown."""
    if predicted is None or measured is None:
        return None
    return 1 / factor <= predicted / measured <= factor
