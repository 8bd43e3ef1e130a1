"""Training data: rows → tokenized sequences → deterministic batches.

Rows are read, formatted and masked by `data.dataset` (loss on completion tokens only). Here we
shift labels into next-token targets per example, optionally pack, and cut the data stream into
steps. The order is a function of the seed alone, so LoRA and FullFT runs with one seed see the
same examples in the same order, and a resumed run continues exactly where the killed one was.

Packing: whole examples are placed greedily, in a seeded order, into rows of at most `max_length`
tokens. Each example's `position_ids` restart at 0 and no attention mask is passed, which makes
transformers build a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`):
a token attends only to earlier tokens of its own example. Targets are shifted inside each
example before packing, so no prediction crosses an example boundary. The held-out set is never
packed, so its loss does not depend on `packing`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass, field

from data.dataset import IGNORE_INDEX
from data.errors import UserError


@dataclass(frozen=True)
class Sequence:
    """One training row: tokens, next-token targets (IGNORE_INDEX = no loss) and positions."""

    input_ids: list[int]
    targets: list[int]
    position_ids: list[int]

    @property
    def loss_tokens(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


@dataclass
class PreparedData:
    """Tokenized train and held-out sequences plus what the run summary reports about them."""

    train: list[Sequence]
    eval: list[Sequence]
    format: str
    fingerprint: str
    stats: dict = field(default_factory=dict)


def to_sequence(example) -> Sequence:
    """A `data.dataset.TokenizedExample` as a row: targets[t] = labels[t + 1], the next token."""
    ids = list(example.input_ids)
    targets = list(example.labels[1:]) + [IGNORE_INDEX]
    return Sequence(ids, targets, list(range(len(ids))))


def example_id(seq: Sequence) -> str:
    """16 hex chars naming a tokenized example (its tokens and targets): two runs scored the same
    held-out examples exactly when their lists of ids are equal."""
    payload = json.dumps([seq.input_ids, seq.targets], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def pack(sequences: list[Sequence], max_length: int, seed: int) -> list[Sequence]:
    """Greedily concatenate whole sequences (in a seeded order) into rows of <= max_length tokens."""
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    rows: list[Sequence] = []
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    for i in order:
        seq = sequences[i]
        if ids and len(ids) + len(seq.input_ids) > max_length:
            rows.append(Sequence(ids, targets, positions))
            ids, targets, positions = [], [], []
        ids += seq.input_ids
        targets += seq.targets
        positions += seq.position_ids
    if ids:
        rows.append(Sequence(ids, targets, positions))
    return rows


def load_split(config) -> tuple[list[dict], list[dict], list[dict]]:
    """The raw rows of an RL run config (`RLConfig`: prompts with answers, not tokenized; supervised
    runs use `split_data`): (all rows of `dataset`, training rows, scored held-out rows), chosen by the
    one held-out selection (`data.split.select`) as the supervised runs choose theirs.

    Raises:
        UserError: no rows, no held-out rows, or too few rows to split.
    """
    from data.dataset import load_rows
    from data.split import select

    rows = load_rows(config.dataset, limit=config.dataset_limit, columns=config.columns)
    if not rows:
        raise UserError(f"Dataset {config.dataset!r} has no rows: check the path or the filter.")
    held_out = rows if config.eval_dataset is None else load_rows(config.eval_dataset, columns=config.columns)
    if not held_out:
        raise UserError(f"Held-out dataset {config.eval_dataset!r} has no rows.")
    selection = select(len(rows), config.eval_fraction, config.held_out_seed, config.eval_max_examples,
                       held_out_rows=None if config.eval_dataset is None else len(held_out))
    _check_split(selection, len(rows), config.eval_fraction)
    return rows, [rows[i] for i in selection.train], [held_out[i] for i in selection.scored]


def _check_split(selection, rows: int, eval_fraction: float) -> None:
    if not selection.train or not selection.held_out:
        raise UserError(
            f"{rows} rows are too few to split off a held-out set with eval_fraction={eval_fraction}: "
            "give more rows or an eval_dataset of its own."
        )


def split_data(config, tokenizer):
    """Read and tokenize (once: `data.token_cache`) the data of a run config and split it with the one
    held-out selection (`data.split`): a `data.split.DataSplit`.

    Raises:
        UserError: the data cannot be read, or is too small to hold a set out.
    """
    from data.split import split_tokenized

    split = split_tokenized(config.dataset, tokenizer, eval_fraction=config.eval_fraction, seed=config.held_out_seed,
                            max_examples=config.eval_max_examples, dataset_limit=config.dataset_limit,
                            eval_dataset=config.eval_dataset, columns=config.columns)
    _check_split(split.selection, split.data.rows, config.eval_fraction)
    return split


def check_data(config, tokenizer):
    """`split_data`, and every row the run will use checked against max_length, without building
    the run's sequences: what a pipeline checks before any run. Returns the split (`.data` is the
    dataset's TokenizedDataset, `.scored_idx` the held-out rows the runs score).

    Raises:
        UserError: as `split_data`, or a prompt that alone fills max_length (names the row).
    """
    split = split_data(config, tokenizer)
    split.data.check_max_length(config.max_length, split.train_idx)
    split.held_out.check_max_length(config.max_length, split.scored_idx)
    return split


def prepare_data(config, tokenizer) -> PreparedData:
    """Split, cut to max_length and optionally pack the data of `config` (a TrainConfig).

    `stats` accounts for every row read: rows = train_rows + held_out_rows (split off `dataset`,
    or read from `eval_dataset`); of the held-out rows the first `eval_max_examples` are scored
    (`held_out_unscored` are not); rows left with no completion token after truncation are
    dropped (`dropped_train`, `dropped_eval`).

    Raises:
        UserError: empty dataset, missing columns, a prompt that fills max_length (from planner).
    """
    from data.split import has_completion

    split = split_data(config, tokenizer)
    data, held_out = split.data, split.held_out
    train_examples = data.examples(split.train_idx, config.max_length)
    # An example whose completion was cut away entirely has nothing to learn or score: drop it.
    train = [s for s in map(to_sequence, train_examples) if s.loss_tokens]
    eval_examples = held_out.examples(split.scored_idx, config.max_length)
    evals = [to_sequence(e) for e in eval_examples if has_completion(e)]  # what the evaluator scores
    if not train or not evals:
        raise UserError(
            f"No {'training' if not train else 'held-out'} example keeps a completion token within "
            f"max_length={config.max_length}: raise max_length or shorten the prompts."
        )
    stats = {
        "format": data.format,
        "columns": config.columns,
        "ignored_columns": list(data.ignored_columns),
        "rows": data.rows + (held_out.rows if held_out is not data else 0),
        "train_rows": len(split.train_idx),
        "held_out_rows": len(split.held_out_idx),
        "held_out_unscored": len(split.held_out_idx) - len(split.scored_idx),
        "dropped_train": len(train_examples) - len(train),
        "dropped_eval": len(eval_examples) - len(evals),
        "train_examples": len(train),
        "eval_examples": len(evals),
        "dropped_without_completion": len(train_examples) + len(eval_examples) - len(train) - len(evals),
        "train_truncated": sum(e.truncated for e in train_examples),
        "eval_truncated": sum(e.truncated for e in eval_examples),
        "train_tokens": sum(len(s.input_ids) for s in train),
        "train_completion_tokens": sum(s.loss_tokens for s in train),
        "eval_completion_tokens": sum(s.loss_tokens for s in evals),
    }
    if config.packing:
        train = pack(train, config.max_length, config.seed)
        stats["packed_rows"] = len(train)
    # The config hash holds the split (eval_fraction, seed, limits), so the data read identifies the rows.
    fingerprint = data.fingerprint + ("" if held_out is data else "+" + held_out.fingerprint)
    return PreparedData(train, evals, data.format, fingerprint, stats)


def describe_data(data: PreparedData, config) -> str:
    """The run's data line, accounting for every row read: train + held-out (scored or beyond
    eval_max_examples), then what was dropped or truncated."""
    from data.dataset import describe_format

    s = data.stats
    if config.eval_dataset is None:
        rows = f"{s['rows']:,} rows of {describe_format(data.format)} = {s['train_rows']:,} train + "
    else:
        rows = (f"{s['train_rows']:,} train rows of {describe_format(data.format)} + from "
                f"{config.eval_dataset} ")
    scored = s["held_out_rows"] - s["held_out_unscored"]
    held_out = f"{s['held_out_rows']:,} held-out"
    if s["held_out_unscored"]:
        held_out += (f" ({scored:,} scored, {s['held_out_unscored']:,} beyond "
                     f"eval_max_examples={config.eval_max_examples})")
    dropped = s["dropped_train"] + s["dropped_eval"]
    line = (f"data: {rows}{held_out}; {dropped:,} dropped"
            + (f" ({s['dropped_train']:,} train, {s['dropped_eval']:,} held-out)" if dropped else "")
            + f" (no completion token within max_length={config.max_length}), "
            f"{s['train_truncated'] + s['eval_truncated']:,} truncated to {config.max_length} tokens")
    if config.packing:
        line += f"; {s['train_examples']:,} train examples packed into {s['packed_rows']:,} rows"
    if s.get("columns"):
        line += "; columns mapped: " + ", ".join(f"{k} <- {v}" for k, v in s["columns"].items())
    if s.get("ignored_columns"):
        line += f"; columns ignored: {', '.join(s['ignored_columns'])}"
    return line


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def step_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the examples in optimizer step `step` (0-based): the next `global_batch` items of
    an endless stream of seeded permutations of range(n), reshuffled each epoch."""
    start = step * global_batch
    return [_epoch_order(n, seed, k // n)[k % n] for k in range(start, start + global_batch)]


def micro_batches(indices: list[int], batch_size: int, num_processes: int, process_index: int) -> list[list[int]]:
    """This process's micro-batches of one step, in accumulation order.

    The step's examples are cut into chunks of `batch_size`; chunk j goes to process j % P as its
    accumulation step j // P. So 2 processes x 1 accumulation step and 1 process x 2 accumulation
    steps put the same examples in each optimizer step.
    """
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return chunks[process_index::num_processes]


@dataclass(frozen=True)
class Batch:
    """A collated micro-batch: the model's inputs, next-token targets and where the loss is.

    `loss_positions_N` (flat indices row·T + t of the targets that are not IGNORE_INDEX) is
    computed from the Python lists, so the loss never has to find them on the device: no
    data-dependent shape, which keeps the step traceable under FakeTensorMode.
    """

    inputs: dict
    targets_B_T: object
    loss_positions_N: object

    def to(self, device) -> Batch:
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.targets_B_T.to(device),
                     self.loss_positions_N.to(device))


def collate(seqs: list[Sequence], pad_id: int, packed: bool) -> Batch:
    """Right-pad a micro-batch into tensors.

    Unpacked rows get an attention mask (padding masked). Packed rows get position_ids and no mask,
    so transformers masks attention per example; the padding tail is its own segment with no loss.
    """
    import torch

    width = max(len(s.input_ids) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    position_ids = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        targets[row, :n] = torch.tensor(s.targets)
        attention_mask[row, :n] = 1
        position_ids[row, :n] = torch.tensor(s.position_ids)
        position_ids[row, n:] = torch.arange(width - n)
    positions = torch.tensor([row * width + t for row, s in enumerate(seqs)
                              for t, target in enumerate(s.targets) if target != IGNORE_INDEX], dtype=torch.long)
    if packed:
        return Batch({"input_ids": input_ids, "position_ids": position_ids}, targets, positions)
    return Batch({"input_ids": input_ids, "attention_mask": attention_mask}, targets, positions)
