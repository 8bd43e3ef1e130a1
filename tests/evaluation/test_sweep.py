"""LR-sweep fits: a known quadratic optimum is found; edges and thin sweeps are not extrapolated."""

import math

import numpy as np
import pytest

from evaluation.sweep import SweepPoint, fit_lr_sweep


def parabola(method, rank, best_lr, lrs, curvature=0.3, floor=1.0, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [
        SweepPoint(
            method,
            rank,
            lr,
            floor + curvature * (math.log10(lr) - math.log10(best_lr)) ** 2 + noise * rng.standard_normal(),
        )
        for lr in lrs
    ]


LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3]


def test_known_optimum_and_ratio_recovered():
    points = parabola("full", None, 5e-5, LRS) + parabola("lora", 16, 5e-4, LRS, floor=1.02)
    fit = fit_lr_sweep(points)
    full, lora = fit.group("full"), fit.group("lora", 16)
    assert full.status == lora.status == "ok"
    assert full.optimum_lr == pytest.approx(5e-5, rel=1e-6)
    assert lora.optimum_lr == pytest.approx(5e-4, rel=1e-6)
    assert lora.optimum_loss == pytest.approx(1.02, abs=1e-9)
    assert [r.rank for r in fit.lr_ratios] == [16]
    assert fit.lr_ratios[0].ratio == pytest.approx(10.0, rel=1e-6)
    assert fit.expected_ratio == 10.0
    # exact data: the vertex's standard error is ~0
    assert full.log10_lr_stderr == pytest.approx(0.0, abs=1e-6)


def test_noisy_fit_reports_an_uncertainty_that_covers_the_truth():
    fit = fit_lr_sweep(parabola("full", None, 1e-4, np.logspace(-5.5, -2.5, 13), noise=0.01, seed=3))
    g = fit.group("full")
    assert g.status == "ok"
    assert g.log10_lr_stderr > 0
    assert abs(math.log10(g.optimum_lr) - (-4)) < 4 * g.log10_lr_stderr


def test_optimum_beyond_the_range_is_edge_not_extrapolated():
    fit = fit_lr_sweep(parabola("lora", 8, 1e-2, LRS))  # truth above the largest LR swept
    g = fit.group("lora", 8)
    assert g.status == "edge"
    assert g.optimum_lr is None
    assert "extend the sweep" in g.message
    assert g.best_observed_lr == 3e-3
    assert fit.lr_ratios == ()


def test_monotone_losses_at_the_edge():
    points = [SweepPoint("full", None, lr, loss) for lr, loss in [(1e-5, 1.0), (1e-4, 1.1), (1e-3, 1.5)]]
    g = fit_lr_sweep(points).group("full")
    assert g.status == "edge"
    assert "lower LRs" in g.message


def test_concave_fit_with_the_best_run_inside_is_not_convex():
    # best run at 1e-4 (inside), but the points as a whole bend downwards (a < 0)
    lrs_losses = [(1e-5, 1.1), (1e-4, 1.0), (1e-3, 1.3), (1e-2, 1.3), (1e-1, 1.05)]
    g = fit_lr_sweep([SweepPoint("full", None, lr, loss) for lr, loss in lrs_losses]).group("full")
    assert g.coefficients[0] < 0
    assert g.status == "not_convex"
    assert g.optimum_lr is None


def test_two_lrs_are_too_few_even_with_repeats():
    points = [SweepPoint("lora", 4, lr, 1.0 + i * 0.01) for i, lr in enumerate([1e-4, 1e-4, 1e-3, 1e-3])]
    g = fit_lr_sweep(points).group("lora", 4)
    assert g.status == "too_few_lrs"
    assert g.lrs == (1e-4, 1e-3)


def test_diverged_runs_are_dropped_with_a_note():
    points = parabola("full", None, 1e-4, LRS) + [SweepPoint("full", None, 1e-2, float("nan"))]
    fit = fit_lr_sweep(points)
    assert fit.group("full").status == "ok"
    assert len(fit.group("full").lrs) == len(LRS)
    assert any("diverged" in n for n in fit.notes)


def test_bad_method_rejected():
    with pytest.raises(ValueError, match="method"):
        fit_lr_sweep([SweepPoint("qlora", 4, 1e-4, 1.0)])
