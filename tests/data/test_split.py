"""data.split: the one held-out selection (the trainer's, RL's and the evaluator's)."""

import pytest

from data.errors import UserError
from data.split import select, split_indices


@pytest.mark.parametrize(
    "n,fraction,n_eval",
    [(100, 0.1, 10), (100, 0.0, 0), (10, 0.25, 2), (2, 0.01, 1), (3, 0.9, 2), (1, 0.5, 0), (0, 0.5, 0)],
)
def test_split_sizes(n, fraction, n_eval):
    train, held_out = split_indices(n, fraction, seed=0)
    assert len(held_out) == n_eval and len(train) == n - n_eval
    assert sorted(train + held_out) == list(range(n))
    assert train == sorted(train) and held_out == sorted(held_out)  # original order kept


def test_split_is_deterministic_and_seed_dependent():
    assert split_indices(50, 0.2, 1) == split_indices(50, 0.2, 1)
    assert split_indices(50, 0.2, 1)[1] != split_indices(50, 0.2, 2)[1]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, True, "0.1"])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        split_indices(2, fraction, 0)


def test_select_scores_the_first_held_out_rows():
    train, held_out = split_indices(30, 0.2, 3)
    assert select(30, 0.2, 3, None) == select(30, 0.2, 3, 100)
    chosen = select(30, 0.2, 3, 2)
    assert (chosen.train, chosen.held_out, chosen.scored) == (train, held_out, held_out[:2])
    # a dataset that is only scored (the evaluator's eval_fraction=None), and a separate held-out set
    assert (select(5, None, 0, 3).train, select(5, None, 0, 3).scored) == ([], [0, 1, 2])
    separate = select(4, 0.5, 0, None, held_out_rows=3)
    assert (separate.train, separate.held_out) == ([0, 1, 2, 3], [0, 1, 2])
