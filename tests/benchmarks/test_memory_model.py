"""A subset of the memory benchmark's grid (benchmarks/memory_model.py): the planner's allocated
bytes within 10% of the trainer's measured step, and the results table it writes."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("memory_model", ROOT / "benchmarks" / "memory_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Llama-3.2-1B: full (mixed) 4x2048, full_bf16 with checkpointing 8x1024, LoRA 8x4096.
SUBSET = (0, 1, 2)


@pytest.mark.slow  # ~30 s on 2 idle cores: three set-ups, each measured at 2 and 3 layers
def test_grid_subset_is_within_ten_percent(bench, tmp_path):
    rows = bench.compare([bench.GRID[i] for i in SUBSET])
    for row in rows:
        assert 0.90 <= row["ratio"] <= 1.10, row
    text = bench.markdown(rows, "pytest", 1.0)
    assert text.count("| Llama-3.2-1B ") == len(SUBSET) and "Command: `pytest`" in text


def test_grid_covers_the_issue(bench):
    grid = bench.GRID
    assert len(grid) >= 12
    assert {s.method for s in grid} == {"full", "full_bf16", "lora"}
    assert {s.gradient_checkpointing for s in grid} == {False, True}
    assert {s.model for s in grid} >= {"Llama-3.2-1B", "Llama-3.1-8B", "Qwen3-8B", "Qwen3-30B-A3B"}
    assert min(s.micro_batch for s in grid) == 1 and max(s.micro_batch for s in grid) == 8
    assert min(s.seq_len for s in grid) == 512 and max(s.seq_len for s in grid) == 4096


@pytest.mark.slow  # ~15 s: two sharded set-ups, each at 2 and 3 layers under the fake process group
def test_one_fsdp_rank_is_within_ten_percent_and_its_section_keeps_the_table(bench, tmp_path):
    """Rank 0 of 8 FullFT ranks and of 2 LoRA ranks of Llama-3.1-8B, measured on the trainer's FSDP2 step."""
    setups = [s for s in bench.SHARDED_GRID if (s.model, s.method, s.world_size) in
              {("Llama-3.1-8B", "full", 8), ("Llama-3.1-8B", "lora", 2)}]
    rows = bench.compare(setups)
    assert len(rows) == 2
    for row in rows:
        assert 0.90 <= row["ratio"] <= 1.10, row
    results = tmp_path / "MEMORY_RESULTS.md"
    results.write_text("# table\n\n| 1 | single GPU |\n")
    bench.write_section(results, bench.sharded_markdown(rows, "pytest", 1.0))
    bench.write_section(results, bench.sharded_markdown(rows, "pytest again", 1.0))  # replaced, not appended
    text = results.read_text()
    assert text.startswith("# table\n\n| 1 | single GPU |\n") and text.count(bench.SHARDED_SECTION) == 1
    assert "pytest again" in text and "| Llama-3.1-8B full 1x2048 fsdp8 |" in text


def test_sharded_grid_covers_the_issue(bench):
    worlds = {(s.model, s.method): set() for s in bench.SHARDED_GRID}
    for s in bench.SHARDED_GRID:
        worlds[(s.model, s.method)].add(s.world_size)
    assert worlds[("Llama-3.1-8B", "full")] == worlds[("Llama-3.1-8B", "lora")] == {2, 4, 8}
    assert worlds[("Qwen3-30B-A3B", "lora")] == {2, 4, 8}
