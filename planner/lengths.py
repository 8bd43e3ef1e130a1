"""Sequence lengths from the data: the distribution, what a max_length truncates, and the row width
the trainer really runs (which is what GPU memory must be sized for).

The trainer (trainer/data.py) pads each micro-batch to its longest example, at most `max_length`;
with packing it fills rows with whole examples up to `max_length`. So without packing the widest
micro-batch is min(max_length, the longest example), and with packing it is max_length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# A suggested max_length keeps this share of examples whole, rounded up to a multiple of
# LENGTH_MULTIPLE (tensor-core friendly widths; the usual choice in SFT recipes).
SUGGESTED_COVERAGE = 0.99
LENGTH_MULTIPLE = 64


@dataclass(frozen=True)
class LengthPlan:
    """Token lengths of the (sampled) examples and what they mean for a run.

    Attributes:
        examples: examples the figures are computed from (a sample when the dataset is large).
        p50_tokens, p95_tokens, p99_tokens, max_tokens: example lengths (prompt + completion), by
            the nearest-rank percentile.
        max_length: the planned max_length (`--seq-len`).
        truncated_share: share of examples longer than max_length (cut by the trainer).
        suggested_max_length: the least multiple of LENGTH_MULTIPLE that keeps SUGGESTED_COVERAGE of
            the examples whole (never above the longest example rounded up).
        suggested_truncated_share: share of examples that length cuts.
        packing: whether the run packs examples into rows.
        memory_seq_len: tokens per row the memory estimate uses.
    """

    examples: int
    p50_tokens: int
    p95_tokens: int
    p99_tokens: int
    max_tokens: int
    max_length: int
    truncated_share: float
    suggested_max_length: int
    suggested_truncated_share: float
    packing: bool
    memory_seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[int] | tuple[int, ...], q: float) -> int:
    """Nearest-rank percentile (q in [0, 100]) of sorted values: the least value with at least q% of
    the values at or below it."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def truncated_share(sorted_lengths: list[int] | tuple[int, ...], max_length: int) -> float:
    """Share of examples longer than max_length."""
    return sum(n > max_length for n in sorted_lengths) / len(sorted_lengths)


def plan_lengths(token_lengths: list[int] | tuple[int, ...], max_length: int, packing: bool = False) -> LengthPlan:
    """The length figures of a plan from the examples' token lengths.

    Raises:
        ValueError: no lengths.
    """
    lengths = sorted(token_lengths)
    if not lengths:
        raise ValueError("no token lengths")
    longest = lengths[-1]
    covering = percentile(lengths, 100 * SUGGESTED_COVERAGE)
    suggested = min(math.ceil(covering / LENGTH_MULTIPLE), math.ceil(longest / LENGTH_MULTIPLE)) * LENGTH_MULTIPLE
    memory_seq_len = max_length if packing else min(max_length, longest)
    return LengthPlan(
        examples=len(lengths), p50_tokens=percentile(lengths, 50), p95_tokens=percentile(lengths, 95),
        p99_tokens=percentile(lengths, 99), max_tokens=longest, max_length=max_length,
        truncated_share=truncated_share(lengths, max_length), suggested_max_length=suggested,
        suggested_truncated_share=truncated_share(lengths, suggested), packing=packing,
        memory_seq_len=memory_seq_len,
    )
