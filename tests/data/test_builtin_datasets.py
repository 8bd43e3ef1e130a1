"""data.builtin_datasets: facts with exactly known information, pydoc from Python's own text."""

import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data.builtin_datasets import (
    FACT_ATTRIBUTES,
    FACTS_MAX_CHOICES,
    _truncate_paragraphs,
    facts_information_bits,
    facts_max_facts,
    facts_rows,
    numpydoc_rows,
    parse_builtin,
    pydoc_rows,
)
from data.dataset import dataset_fingerprint, detect_format, load_rows
from data.errors import UserError

ANSWER = re.compile(r"^The (?P<attr>[a-z ]+) of (?P<entity>[A-Z][a-z]+) is (?P<value>[A-Za-z]+)\.$")


@pytest.mark.parametrize(
    "n_facts,choices,bits",
    [(1, 2, 1.0), (1000, 16, 4000.0), (2000, 16, 8000.0), (10, 32, 50.0), (3, 3, 3 * 1.584962500721156)],
)
def test_facts_information_bits(n_facts, choices, bits):
    assert facts_information_bits(n_facts, choices) == pytest.approx(bits, rel=1e-12)


@pytest.mark.parametrize(
    "n_facts,choices", [(0, 16), (10, 1), (10, FACTS_MAX_CHOICES + 1), (10**9, 2), (2.5, 4)]
)
def test_facts_rejects_out_of_range(n_facts, choices):
    with pytest.raises(UserError, match="builtin:facts needs"):
        facts_rows(n_facts, choices)
    with pytest.raises(UserError):
        facts_information_bits(n_facts, choices)


def test_facts_shape_uniqueness_and_consistency():
    rows = facts_rows(400, 8, seed=3)
    assert len(rows) == 400 and detect_format(rows) == "chat"
    pairs = set()
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        m = ANSWER.match(assistant["content"])
        assert m, assistant["content"]
        # The question names exactly the (attribute, entity) the answer is about.
        assert user["content"] == f"What is the {m['attr']} of {m['entity']}?"
        pool = dict(FACT_ATTRIBUTES)[m["attr"]]
        assert m["value"] in pool[:8]  # only the first `choices` values are used
        pairs.add((m["entity"], m["attr"]))
    assert len(pairs) == 400  # every fact is about a distinct (entity, attribute) pair


def test_facts_values_look_uniform():
    # 4000 draws from 4 values: each count ~ Binomial(4000, 1/4), sd ≈ 27; 6 sd is a safe margin.
    counts = Counter(
        ANSWER.match(r["messages"][1]["content"])["value"]
        for r in facts_rows(4000, 4, seed=0)
        if r["messages"][1]["content"].startswith("The favourite colour")
    )
    assert sum(counts.values()) == 1000 and len(counts) == 4
    assert all(abs(c - 250) < 6 * math.sqrt(1000 * 0.25 * 0.75) for c in counts.values())


def test_facts_deterministic_by_seed():
    assert facts_rows(50, 16, seed=1) == facts_rows(50, 16, seed=1)
    assert facts_rows(50, 16, seed=1) != facts_rows(50, 16, seed=2)
    assert facts_max_facts() >= 100_000  # plenty of room for capacity experiments


def test_pydoc_is_non_empty_clean_and_deterministic():
    rows = pydoc_rows()
    assert len(rows) > 300 and detect_format(rows) == "chat"
    questions = [r["messages"][0]["content"] for r in rows]
    assert len(set(questions)) == len(questions)
    assert "What does `json.dumps` do?" in questions
    assert "Explain the Python topic 'assignment'." in questions
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows}
    assert answers["What does `json.dumps` do?"].startswith("Serialize ``obj`` to a JSON formatted ``str``.")
    assignment = answers["Explain the Python topic 'assignment'."]
    assert assignment.startswith("Assignment statements\n\nAssignment statements are used")  # underline gone
    assert all(len(a) >= 40 for a in answers.values())
    assert pydoc_rows(limit=7) == rows[:7]
    assert pydoc_rows() == rows


def test_pydoc_does_not_depend_on_what_the_caller_imported():
    # torch patches inspect.getfile on import; pydoc is built in a clean interpreter so the rows,
    # and the fingerprint the FullFT cache is keyed on, are the same in every process.
    code = (
        "import inspect; inspect.getfile = lambda o: ''\n"
        "from data.builtin_datasets import pydoc_rows\n"
        "from data.dataset import dataset_fingerprint\n"
        "print(dataset_fingerprint(pydoc_rows()))"
    )
    root = Path(__file__).resolve().parents[2]  # this checkout, not an installed copy
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == dataset_fingerprint(pydoc_rows())


def test_numpydoc_is_numpys_own_text_clean_and_deterministic():
    rows = numpydoc_rows()
    assert len(rows) > 300 and detect_format(rows) == "chat"
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows}
    assert len(answers) == len(rows)
    assert answers["What does `numpy.argsort` do?"].startswith("Returns the indices that would sort an array.")
    assert answers["What does `numpy.linalg.svd` do?"].startswith("Singular Value Decomposition.")
    # A ufunc: its signature line is dropped and nothing after the summary is kept.
    assert answers["What does `numpy.isnan` do?"] == "Test element-wise for NaN and return result as a boolean array."
    for answer in answers.values():
        assert len(answer) >= 40
        assert "\nParameters\n---" not in answer and "\nExamples\n---" not in answer
    assert numpydoc_rows(limit=5) == rows[:5]
    assert load_rows("builtin:numpydoc?limit=5") == rows[:5]


@pytest.mark.parametrize(
    "text,max_chars,expected",
    [
        ("aa\n\nbb\n\ncc", 6, "aa\n\nbb"),
        ("aa\n\nbb\n\ncc", 100, "aa\n\nbb\n\ncc"),
        ("line one\nline two\n\nnext", 12, "line one"),  # first paragraph too long: cut at a line
        ("", 10, ""),
    ],
)
def test_truncate_paragraphs(text, max_chars, expected):
    assert _truncate_paragraphs(text, max_chars) == expected


@pytest.mark.parametrize(
    "source,name,options",
    [
        ("builtin:facts", "facts", {"n_facts": 1000, "choices": 16, "seed": 0}),
        (
            "builtin:facts?n_facts=2000&choices=16&seed=0",
            "facts",
            {"n_facts": 2000, "choices": 16, "seed": 0},
        ),
        ("builtin:facts?choices=4", "facts", {"n_facts": 1000, "choices": 4, "seed": 0}),
        ("builtin:pydoc?limit=500", "pydoc", {"limit": 500}),
        ("builtin:pydoc", "pydoc", {"limit": None}),
        ("builtin:numpydoc?limit=50", "numpydoc", {"limit": 50}),
    ],
)
def test_parse_builtin(source, name, options):
    spec = parse_builtin(source)
    assert (spec.name, spec.options) == (name, options)
