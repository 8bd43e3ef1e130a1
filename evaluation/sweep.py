"""Learning-rate sweep analysis: each method/rank's optimal LR and LoRA's LR over FullFT's.

For each (method, rank) the final loss is fit against x = log10(LR) with a quadratic
loss ≈ a·x² + b·x + c (scipy least squares); the vertex x* = −b / 2a is the optimal LR. A fit is
trusted only with ≥ 3 distinct LRs, the best run not at either end of the sweep (so the data
shows the loss rising on both sides), a > 0 (convex) and x* inside the swept range; otherwise the
optimum would be an extrapolation, so it is reported as "at the edge, extend the sweep".
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass

# LoRA's optimal LR is ~10x FullFT's, for SFT and RL ("LoRA Without Regret", Thinking Machines
# 2025; tinker-cookbook's get_lora_lr_over_full_finetune_lr returns 10). Reported beside the
# measured ratio so a user sees whether their sweep agrees.
EXPECTED_LORA_OVER_FULL_LR = 10.0

MIN_DISTINCT_LRS = 3


@dataclass(frozen=True)
class SweepPoint:
    """One finished run of a sweep: its final held-out loss (nats/token) at one LR."""

    method: str
    """"lora" or "full"."""
    rank: int | None
    """LoRA rank; ignored (None) for FullFT."""
    lr: float
    final_loss: float


@dataclass(frozen=True)
class GroupFit:
    """The LR fit of one method/rank.

    status: "ok" (optimum inside the swept range), "edge" (optimum at or beyond an end of the
    range: extend the sweep), "too_few_lrs" (fewer than 3 distinct LRs) or "not_convex" (the
    losses do not curve up on both sides: noisy runs, or a sweep too narrow to see the optimum).
    """

    method: str
    rank: int | None
    status: str
    message: str
    lrs: tuple[float, ...]
    best_observed_lr: float
    best_observed_loss: float
    optimum_lr: float | None = None
    optimum_loss: float | None = None
    log10_lr_stderr: float | None = None
    """Standard error of log10(optimum LR) from the fit's covariance; None with only 3 points."""
    coefficients: tuple[float, float, float] | None = None
    """(a, b, c) of loss = a·log10(lr)² + b·log10(lr) + c."""

    @property
    def label(self) -> str:
        return "FullFT" if self.method == "full" else f"LoRA r={self.rank}"


@dataclass(frozen=True)
class LrRatio:
    """LoRA's optimal LR at one rank over FullFT's optimal LR."""

    rank: int | None
    ratio: float


@dataclass(frozen=True)
class SweepFit:
    groups: tuple[GroupFit, ...]
    lr_ratios: tuple[LrRatio, ...]
    expected_ratio: float = EXPECTED_LORA_OVER_FULL_LR
    notes: tuple[str, ...] = ()

    def group(self, method: str, rank: int | None = None) -> GroupFit:
        key = (method, None if method == "full" else rank)
        for g in self.groups:
            if (g.method, g.rank) == key:
                return g
        raise KeyError(key)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _quadratic(x, a, b, c):
    return a * x * x + b * x + c


def fit_group(method: str, rank: int | None, lrs: list[float], losses: list[float]) -> GroupFit:
    """Fit one method/rank's loss against log10 LR; see the module docstring for the guards."""
    import numpy as np
    from scipy.optimize import OptimizeWarning, curve_fit

    x = np.log10(np.asarray(lrs, dtype=float))
    y = np.asarray(losses, dtype=float)
    distinct = tuple(sorted(set(float(v) for v in lrs)))
    best = int(np.argmin(y))
    base = dict(
        method=method,
        rank=rank,
        lrs=distinct,
        best_observed_lr=float(lrs[best]),
        best_observed_loss=float(y[best]),
    )
    extend = _extend_hint(float(lrs[best]), distinct)
    if len(distinct) < MIN_DISTINCT_LRS:
        return GroupFit(
            status="too_few_lrs",
            message=(
                f"{len(distinct)} distinct LR(s); need at least {MIN_DISTINCT_LRS} to locate an optimum."
            ),
            **base,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)  # 3 points: exact fit, no covariance
        (a, b, c), cov = curve_fit(_quadratic, x, y, p0=(0.0, 0.0, float(y.mean())))
    coefficients = (float(a), float(b), float(c))
    if extend:
        # The data never shows the loss rising on the far side of the best run, so any vertex the
        # parabola puts there is a guess from its curvature alone.
        return GroupFit(status="edge", message=extend, coefficients=coefficients, **base)
    if not a > 0:
        return GroupFit(
            status="not_convex",
            coefficients=coefficients,
            message=("the losses do not curve up around an optimum (noisy runs?): add seeds or LRs."),
            **base,
        )
    vertex = -b / (2 * a)
    if not (x.min() < vertex < x.max()):
        side = "below the smallest" if vertex <= x.min() else "above the largest"
        return GroupFit(
            status="edge",
            coefficients=coefficients,
            message=(
                f"the fitted optimum ({10**vertex:.3g}) lies {side} LR swept: at the edge, extend "
                "the sweep rather than trust an extrapolation."
            ),
            **base,
        )
    stderr = None
    if len(x) > 3 and np.all(np.isfinite(cov)):
        # Delta method on x* = -b / 2a: gradient with respect to (a, b, c).
        grad = np.array([b / (2 * a * a), -1 / (2 * a), 0.0])
        stderr = float(math.sqrt(max(grad @ cov @ grad, 0.0)))
    return GroupFit(
        status="ok",
        message=f"optimum LR {10**vertex:.3g} inside the swept range.",
        optimum_lr=float(10**vertex),
        optimum_loss=float(_quadratic(vertex, a, b, c)),
        log10_lr_stderr=stderr,
        coefficients=coefficients,
        **base,
    )


def _extend_hint(best_lr: float, distinct: tuple[float, ...]) -> str:
    if best_lr == distinct[0]:
        return (
            f"the best run is at the smallest LR ({best_lr:.3g}): at the edge, extend the sweep to lower LRs."
        )
    if best_lr == distinct[-1]:
        return (
            f"the best run is at the largest LR ({best_lr:.3g}): at the edge, extend the sweep to higher LRs."
        )
    return ""


def fit_lr_sweep(points: list[SweepPoint]) -> SweepFit:
    """Fit every method/rank in a sweep and report LoRA's optimal LR over FullFT's, per rank.

    Points whose loss is not finite (diverged runs) are dropped with a note. A ratio is reported
    only when both the LoRA rank's fit and FullFT's fit are "ok".
    """
    groups: dict[tuple[str, int | None], list[SweepPoint]] = defaultdict(list)
    notes = []
    for p in points:
        if p.method not in ("lora", "full"):
            raise ValueError(f"sweep point method must be 'lora' or 'full', got {p.method!r}")
        if not (p.lr > 0):
            raise ValueError(f"sweep point LR must be > 0, got {p.lr!r}")
        if not math.isfinite(p.final_loss):
            notes.append(f"dropped {p.method} rank={p.rank} lr={p.lr:.3g}: loss {p.final_loss} (diverged?)")
            continue
        groups[(p.method, None if p.method == "full" else p.rank)].append(p)
    fits = tuple(
        fit_group(method, rank, [p.lr for p in pts], [p.final_loss for p in pts])
        for (method, rank), pts in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
    )
    full = next((g for g in fits if g.method == "full" and g.status == "ok"), None)
    ratios = ()
    if full is not None:
        ratios = tuple(
            LrRatio(rank=g.rank, ratio=g.optimum_lr / full.optimum_lr)
            for g in fits
            if g.method == "lora" and g.status == "ok"
        )
    return SweepFit(groups=fits, lr_ratios=ratios, notes=tuple(notes))


def points_from_runs(run_dirs) -> list[SweepPoint]:
    """Sweep points from trainer output directories: method, rank and lr from summary.json's
    config, final loss = the run's final eval loss.

    Raises:
        UserError: a run is unreadable or records no method, lr or final eval loss.
    """
    from data.errors import UserError
    from evaluation.runs import load_run

    points = []
    for run_dir in run_dirs:
        run = load_run(run_dir)
        lr, loss = run.config.get("lr"), run.get("final_eval_loss")
        if run.method not in ("lora", "full") or lr is None or loss is None:
            raise UserError(
                f"{run.path}/summary.json lacks the method, config.lr or final_eval_loss a sweep "
                "point needs: pass finished trainer runs trained with eval_points > 0."
            )
        rank = run.config.get("rank") if run.method == "lora" else None
        points.append(SweepPoint(run.method, rank, float(lr), float(loss)))
    return points
