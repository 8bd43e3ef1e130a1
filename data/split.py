"""The one held-out selection: which rows a run trains on, which it holds out, and which of those it
scores. The supervised trainer (`trainer.data.split_data`), RL (`trainer.data.load_split`) and the
evaluator (`evaluation.nll.held_out_examples`, hence `lowregret evaluate` and the study's
calibration) all choose through `select`, so the gate's examples are the ones the runs held out.

Rows are indexed in the order `data.dataset.load_rows` reads them (after `dataset_limit`); the
held-out rows come from `split_indices` (a seeded shuffle) or are every row of a separate
held-out dataset; the scored rows are the first `max_examples` held-out rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from data.errors import UserError


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/eval split of row indices 0..n-1.

    The indices are shuffled with `random.Random(seed)`; the first round(n·eval_fraction) (at
    least 1 when eval_fraction > 0 and n ≥ 2, at most n − 1) go to eval. Each part is in
    ascending order (the rows' original order).

    Raises:
        UserError: eval_fraction outside [0, 1).
    """
    if (
        isinstance(eval_fraction, bool)
        or not isinstance(eval_fraction, (int, float))
        or not 0 <= eval_fraction < 1
    ):
        raise UserError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    eval_idx = set(order[:n_eval])
    return [i for i in range(n) if i not in eval_idx], sorted(eval_idx)


@dataclass(frozen=True)
class Selection:
    """Indices of the rows a run trains on, holds out, and scores (the first `max_examples` held out).
    With a separate held-out dataset, `held_out` and `scored` index that dataset's rows."""

    train: list[int]
    held_out: list[int]
    scored: list[int]


def select(rows: int, eval_fraction: float | None, seed: int, max_examples: int | None,
           held_out_rows: int | None = None) -> Selection:
    """The held-out selection of a dataset of `rows` rows.

    `held_out_rows` given (the row count of a separate held-out dataset): every row of `dataset` trains
    and every row of the held-out dataset is held out. Else `eval_fraction` of the rows is split off
    with `split_indices(rows, eval_fraction, seed)`, or, when it is None, every row is held out (a
    dataset scored, not trained on). Then the first `max_examples` held-out rows are scored.

    Raises:
        UserError: eval_fraction outside [0, 1).
    """
    if held_out_rows is not None:
        train, held_out = list(range(rows)), list(range(held_out_rows))
    elif eval_fraction is None:
        train, held_out = [], list(range(rows))
    else:
        train, held_out = split_indices(rows, eval_fraction, seed)
    return Selection(train, held_out, held_out if max_examples is None else held_out[:max_examples])


@dataclass(frozen=True)
class DataSplit:
    """A dataset read and tokenized once (`data.token_cache`), and its held-out selection."""

    data: object  # data.token_cache.TokenizedDataset of the dataset
    held_out: object  # the same, or that of the separate held-out dataset
    selection: Selection

    @property
    def train_idx(self) -> list[int]:
        return self.selection.train

    @property
    def held_out_idx(self) -> list[int]:
        return self.selection.held_out

    @property
    def scored_idx(self) -> list[int]:
        return self.selection.scored

    def scored_examples(self, max_length: int) -> list:
        """The scored held-out rows tokenized and cut to `max_length` (`TokenizedExample`s), without those
        left with no completion token (nothing to score)."""
        return [e for e in self.held_out.examples(self.scored_idx, max_length) if has_completion(e)]


def has_completion(example) -> bool:
    """Whether a tokenized example keeps a completion token (a label after its first token) to learn or score."""
    from data.dataset import IGNORE_INDEX

    return any(label != IGNORE_INDEX for label in example.labels[1:])


def split_tokenized(dataset: str, tokenizer, *, eval_fraction: float | None, seed: int, max_examples: int | None,
                    dataset_limit: int | None = None, eval_dataset: str | None = None,
                    columns: dict | None = None) -> DataSplit:
    """Read and tokenize `dataset` (and `eval_dataset`, with the same column mapping `columns`) through
    the token cache, and `select` its rows.

    Raises:
        UserError: the data cannot be read or tokenized.
    """
    from data.token_cache import tokenized_dataset

    data = tokenized_dataset(dataset, tokenizer, limit=dataset_limit, columns=columns)
    held_out = data if eval_dataset is None else tokenized_dataset(eval_dataset, tokenizer, columns=columns)
    selection = select(data.rows, eval_fraction, seed, max_examples,
                       held_out_rows=None if eval_dataset is None else held_out.rows)
    return DataSplit(data, held_out, selection)
