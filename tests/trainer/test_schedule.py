"""Learning-rate schedule and evaluation points."""

import pytest

from trainer.config import TrainConfig
from trainer.lifecycle import eval_steps
from trainer.loop import lr_lambda


def test_constant_is_flat_and_warmup_ramps():
    assert [lr_lambda(TrainConfig(max_steps=10))(s) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    warm = lr_lambda(TrainConfig(max_steps=10, warmup_steps=3))
    assert [warm(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_decays_from_peak_to_zero():
    f = lr_lambda(TrainConfig(max_steps=10, lr_schedule="cosine"))
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)


@pytest.mark.parametrize("max_steps, points", [(100, 8), (7, 3), (1, 2), (3, 2), (1000, 12), (10, 8), (5, 8),
                                               (100, 2)])
def test_eval_steps_are_log_spaced_from_zero_to_the_end(max_steps, points):
    steps = eval_steps(max_steps, points)
    assert steps[0] == 0 and steps[-1] == max_steps and steps == sorted(set(steps))
    # eval_points counts every evaluation, step 0 and the last included (all steps when fewer).
    assert len(steps) == min(points, max_steps + 1)
    gaps = [b - a for a, b in zip(steps[1:], steps[2:], strict=False)]
    assert gaps == sorted(gaps)  # widening gaps: log spacing


def test_eval_steps_values():
    assert eval_steps(3, 2) == [0, 3]  # two points: the base model and the last step
    assert eval_steps(40, 2) == [0, 40]
    assert eval_steps(4, 3) == [0, 1, 4]
    assert eval_steps(32, 6) == [0, 1, 2, 6, 13, 32]
    assert eval_steps(100, 8) == [0, 1, 2, 5, 10, 22, 46, 100]
