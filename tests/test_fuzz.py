"""Property-based fuzzing (Hypothesis) of every reader of a user's files: the data readers, the YAML
and override parser, the checkpoint state reader and the run-file readers. The property: a clean
refusal (`UserError`) or success, never any other exception, in bounded memory (tracemalloc's peak).
Bounded to a fixed number of examples per reader so CI stays fast; `HYPOTHESIS_PROFILE=long` runs
ten times more.
"""

from __future__ import annotations

import json
import os
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.errors import UserError

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=600, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MEMORY_BOUND = 64 * 2**20  # bytes a reader may allocate for inputs of a few KB

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=30)
# Rows that look like the formats, so the checks past the parser are reached too.
columns = st.sampled_from(["prompt", "completion", "messages", "text", "instruction", "output", "conversations",
                           "role", "content", "from", "value", "answer"])
rowish = st.dictionaries(columns, json_values | st.lists(st.dictionaries(columns, json_values, max_size=3), max_size=4),
                         min_size=1, max_size=4)


def refused_or_fine(call) -> None:
    """Run `call`: a UserError or a result, in bounded memory; anything else fails the property."""
    tracemalloc.start()
    try:
        call()
    except UserError as exc:
        assert str(exc) and len(str(exc)) < 5000
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, peak


def _in_file(name: str, content: bytes | str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    path = folder / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def _read(path: Path) -> None:
    from data.dataset import detect_format, load_rows

    rows = load_rows(str(path))
    detect_format(rows, source=str(path))


@given(st.binary(max_size=2000), st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_data_readers_on_random_bytes(content, suffix):
    refused_or_fine(lambda: _read(_in_file("d" + suffix, content)))


@given(st.lists(rowish | json_values, min_size=1, max_size=6), st.sampled_from([".jsonl", ".json"]))
def test_data_readers_on_json_rows(rows, suffix):
    text = "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows)
    refused_or_fine(lambda: _read(_in_file("d" + suffix, text)))


# What random generation rarely reaches: deep nesting, lone surrogates, huge numbers, long and odd lines.
hostile_parts = st.one_of(
    st.integers(1, 5000).map(lambda n: "[" * n + "]" * n),
    st.sampled_from(['"\\ud800"', '"\\udfff x"', "1e400", "-1e400", "NaN", "Infinity", '"\\u0000"', "9" * 5000]),
    st.text(max_size=30).map(json.dumps),
)


@given(st.lists(st.tuples(st.sampled_from(["prompt", "completion", "messages", "text", "answer"]), hostile_parts),
                min_size=1, max_size=4), st.sampled_from([".jsonl", ".json", ".csv"]))
def test_data_readers_on_hostile_values(pairs, suffix):
    row = "{" + ", ".join(f'"{k}": {v}' for k, v in pairs) + "}"
    if suffix == ".jsonl":
        text = row + "\n" + row + "\n"
    elif suffix == ".json":
        text = f"[{row}, {row}]"
    else:
        text = "messages,prompt\n" + "".join(f'"{v.replace(chr(34), chr(34) * 2)}",x\n' for _, v in pairs)
    refused_or_fine(lambda: _read(_in_file("d" + suffix, text)))


@given(st.lists(st.lists(st.text(max_size=30), max_size=5), min_size=1, max_size=6))
def test_the_csv_reader_on_random_cells(table):
    import csv
    import io

    out = io.StringIO()
    csv.writer(out).writerows([["prompt", "completion"], *table])
    refused_or_fine(lambda: _read(_in_file("d.csv", out.getvalue())))


@given(st.text(max_size=600))
def test_the_config_reader_on_random_yaml(text):
    from trainer.config import load_config

    refused_or_fine(lambda: load_config(str(_in_file("c.yaml", text))))


@given(st.dictionaries(st.sampled_from(["model", "seed", "max_steps", "lr", "alpha", "rank", "batch_size", "targets",
                                        "num_epochs", "eval_points", "columns", "launch", "launch.processes",
                                        "mixed_precision", "train.x", "a.b.c"]),
                       st.text(max_size=40) | st.integers(-(2**64), 2**64).map(str)
                       | st.floats().map(repr), max_size=5))
def test_the_override_parser_on_random_values(overrides):
    from trainer.config import load_config

    refused_or_fine(lambda: load_config(None, [f"{k}={v}" for k, v in overrides.items()]))


@given(json_values | st.dictionaries(st.sampled_from(["step", "curves", "tokens", "examples_seen", "global_batch",
                                                     "config_hash", "processes", "sharding"]), json_values))
def test_the_checkpoint_state_reader_on_random_json(state):
    from trainer import checkpoint as ckpt

    folder = Path(tempfile.mkdtemp(prefix="fuzz-")) / "step-3"
    folder.mkdir()
    (folder / ckpt.STATE_FILE).write_text(json.dumps(state))

    def read_and_check():
        loaded = ckpt.read_state(folder)
        ckpt.check_resumable(folder, loaded, "hash", 4, 1, "single")
        ckpt.check_state(folder, loaded, 10, "train")

    refused_or_fine(read_and_check)


run_file_names = st.sampled_from(["summary.json", "curves.json", "eval_scores.json"])


@given(st.dictionaries(run_file_names, json_values | st.binary(max_size=200), min_size=1), st.booleans())
def test_the_run_file_readers_on_random_json(files, rl):
    from evaluation.runs import RL, SUPERVISED, load_run

    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    for name, value in files.items():
        path = folder / name
        (path.write_bytes if isinstance(value, bytes) else path.write_text)(
            value if isinstance(value, bytes) else json.dumps(value))

    def read():
        run = load_run(folder, RL if rl else SUPERVISED)
        run.scores  # noqa: B018 - reading is the property

    refused_or_fine(read)


@pytest.mark.parametrize("objective", ["supervised", "rl"])
def test_a_well_formed_score_file_is_read(tmp_path, objective):
    """The property above is not vacuous: a well-formed run reads."""
    from evaluation.runs import load_run
    from trainer.result import EVAL_SCORES_FILE, scores_record

    (tmp_path / "summary.json").write_text(json.dumps({"method": "lora", "config": {}}))
    (tmp_path / "curves.json").write_text(json.dumps({"train": [[1, 2.0]], "eval": [[0, 2.5]]}))
    (tmp_path / EVAL_SCORES_FILE).write_text(json.dumps(scores_record(objective, ["a"], [1.0], [[0, [0.5]]])))
    assert load_run(tmp_path, objective).scores.by_step == {0: [0.5]}
