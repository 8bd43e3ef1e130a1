"""Lengths from the data: percentiles, truncation, the suggested max_length and the row width."""

import pytest

from planner.lengths import percentile, plan_lengths, truncated_share
from planner.plan import build_plan
from tests.planner.fakes import FakeProfile

LENGTHS = list(range(1, 101))  # 1..100 tokens, one example each


@pytest.mark.parametrize("q, expected", [(0, 1), (50, 50), (95, 95), (99, 99), (99.5, 100), (100, 100)])
def test_nearest_rank_percentile(q, expected):
    assert percentile(LENGTHS, q) == expected


def test_truncated_share_counts_examples_longer_than_max_length():
    assert truncated_share(LENGTHS, 100) == 0
    assert truncated_share(LENGTHS, 90) == pytest.approx(0.10)
    assert truncated_share([5, 5, 600], 512) == pytest.approx(1 / 3)


def test_plan_from_lengths():
    lengths = [100] * 980 + [700] * 15 + [3000] * 5  # p99 = 700 -> suggested 704 (11 × 64)
    n = plan_lengths(lengths, 2048)
    assert (n.p50_tokens, n.p95_tokens, n.p99_tokens, n.max_tokens) == (100, 100, 700, 3000)
    assert n.truncated_share == pytest.approx(0.005)
    assert n.suggested_max_length == 704 and n.suggested_truncated_share == pytest.approx(0.005)
    assert n.memory_seq_len == 2048  # the longest example is cut to max_length
    assert plan_lengths([10, 130], 2048).memory_seq_len == 130  # padded to the longest example
    assert plan_lengths([10, 130], 2048).suggested_max_length == 192
    assert plan_lengths([10, 130], 2048, packing=True).memory_seq_len == 2048  # packed rows are full


def test_plan_sizes_memory_at_the_rows_the_trainer_runs():
    profile = FakeProfile(information_bits=1e5, completion_tokens=10**5, examples=1000, total_tokens=2 * 10**5)
    profile = type("P", (), {**vars(profile), "token_lengths": (100, 200, 400)})()
    padded = build_plan("Llama-3.1-8B", 16, profile=profile, seq_len=2048)
    packed = build_plan("Llama-3.1-8B", 16, profile=profile, seq_len=2048, packing=True)
    assert padded.lengths.memory_seq_len == 400 and padded.settings["memory_seq_len"] == 400
    assert {m.seq_len for m in padded.memory} == {400} and {m.seq_len for m in packed.memory} == {2048}
    assert padded.to_dict()["lengths"]["p50_tokens"] == 200
    assert build_plan("Llama-3.1-8B", 16).lengths is None  # no data: sized at seq_len
