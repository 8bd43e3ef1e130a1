"""builtin:arithmetic: the RL task's prompts and answers."""

import pytest

from data.builtin_datasets import ARITHMETIC_EXAMPLE, ARITHMETIC_SYSTEM, arithmetic_rows
from data.dataset import load_rows
from data.errors import UserError


def test_every_sum_once_with_its_answer():
    rows = arithmetic_rows(max_operand=4)
    assert len(rows) == 5 * 5 - 1  # the worked example's own sum (2 + 3) is not asked
    questions = {r["prompt"][-1]["content"]: r["answer"] for r in rows}
    assert questions["4 + 4"] == "8" and questions["0 + 0"] == "0" and ARITHMETIC_EXAMPLE[0] not in questions
    for question, answer in questions.items():
        a, b = question.split(" + ")
        assert int(a) + int(b) == int(answer)
    system, example_q, example_a, _ = rows[0]["prompt"]
    assert system == {"role": "system", "content": ARITHMETIC_SYSTEM}
    assert (example_q["content"], example_a["content"]) == ARITHMETIC_EXAMPLE and example_a["role"] == "assistant"


def test_order_is_seeded():
    assert load_rows("builtin:arithmetic?max_operand=5&seed=1") == arithmetic_rows(5, seed=1)
    assert arithmetic_rows(5, seed=1) != arithmetic_rows(5, seed=2)
    assert len(load_rows("builtin:arithmetic")) == 99  # default max_operand 9


@pytest.mark.parametrize("source", ["builtin:arithmetic?max_operand=0", "builtin:arithmetic?max_operand=1000"])
def test_bad_range_is_refused(source):
    with pytest.raises(UserError, match="max_operand"):
        load_rows(source)
