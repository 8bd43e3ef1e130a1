"""Column mapping (`columns`): data whose columns have other names trains through a mapping, as
Axolotl's `field_*` keys and LLaMA-Factory's `columns` allow; extra columns are ignored and said so."""

import json

import pytest

from data.dataset import apply_columns, check_columns, detect_format, ignored_columns, load_rows
from data.errors import UserError
from tests.tiny import build_tokenizer

HUMANEVAL = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "canonical_solution": f"    return {i}\n",
              "test": f"assert f{i}() == {i}", "entry_point": f"f{i}"} for i in range(30)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_mapping_reads_other_names_as_a_format(tmp_path):
    source = _write(tmp_path / "HumanEval.jsonl", HUMANEVAL)
    rows = load_rows(source, columns={"completion": "canonical_solution"})
    assert detect_format(rows) == "prompt_completion"
    assert rows[3]["prompt"] == "def f3():\n" and rows[3]["completion"] == "    return 3\n"
    assert "canonical_solution" not in rows[3]
    assert ignored_columns(rows[0], "prompt_completion") == ["entry_point", "task_id", "test"]
    # a mapped name replaces a column of that name
    swapped = apply_columns([{"prompt": "a", "question": "b", "answer": "c"}], {"prompt": "question", "completion": "answer"}, "x")
    assert swapped == [{"prompt": "b", "completion": "c"}]


@pytest.mark.parametrize("columns, says", [
    ({"completion": "solution"}, "names 'solution', which the data lacks; its columns are ['canonical_solution'"),
    ({"answr": "prompt"}, "answr is not a column any format reads"),
    ({"prompt": "task_id", "completion": "task_id"}, "one data column is mapped to two names"),
    ("completion=canonical_solution", "columns maps the names a format reads"),
    ({"completion": ""}, "columns maps the names a format reads"),
])
def test_bad_mappings_are_refused_in_one_line(tmp_path, columns, says):
    source = _write(tmp_path / "HumanEval.jsonl", HUMANEVAL)
    with pytest.raises(UserError) as error:
        load_rows(source, columns=columns)
    assert says in str(error.value)


def test_no_mapping_is_no_mapping():
    assert check_columns(None) is None and check_columns({}) is None


def test_the_token_cache_keys_on_the_mapping(tmp_path):
    from data.token_cache import find_cached, tokenized_dataset

    source = _write(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}", "id": i} for i in range(10)])
    tokenizer = build_tokenizer()
    as_pc = tokenized_dataset(source, tokenizer, columns={"prompt": "question", "completion": "answer"})
    as_text = tokenized_dataset(source, tokenizer, columns={"text": "answer"})
    assert (as_pc.format, as_text.format) == ("prompt_completion", "text")
    assert as_pc.fingerprint != as_text.fingerprint and as_pc.ignored_columns == ("id",)
    assert find_cached(source, tokenizer) is None  # unmapped, the file is not a format at all
    assert find_cached(source, tokenizer, columns={"prompt": "question", "completion": "answer"}).path == as_pc.path


@pytest.mark.slow
def test_train_and_evaluate_a_mapped_dataset_from_the_command_line(tmp_path, tiny_models, capsys):
    """`lowregret train ... columns.completion=canonical_solution` trains, says what it ignores, and
    `lowregret evaluate --run` scores the same held-out rows through the mapping in summary.json."""
    from flows.cli import main

    source = _write(tmp_path / "HumanEval.jsonl", HUMANEVAL)
    out = tmp_path / "run"
    args = ["train", "--no-progress", f"model={tiny_models('llama')}", f"dataset={source}", "max_steps=2",
            "batch_size=2", "max_length=64", "eval_points=2", "checkpoint_every=0", f"output_dir={out}"]
    assert main(args) == 2  # unmapped: refused, with the mapping the names suggest
    assert "columns.completion=canonical_solution" in capsys.readouterr().err and not out.exists()
    assert main(args + ["columns.completion=canonical_solution"]) == 0
    printed = capsys.readouterr().out
    assert "columns mapped: completion <- canonical_solution; columns ignored: entry_point, task_id, test" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["columns"] == {"completion": "canonical_solution"}
    assert main(["evaluate", "--run", str(out), "--device", "cpu", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["trained"]["nats_per_token"] == pytest.approx(summary["final_eval_loss"], abs=1e-5)
