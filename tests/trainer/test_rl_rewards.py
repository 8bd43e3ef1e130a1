"""Reward specs: parsing, exact and regex scoring, user functions (explicit, checked)."""

import pytest

from data.errors import UserError
from trainer.rewards import RewardSpec, load_reward, normalize, parse_reward


@pytest.mark.parametrize("spec, parsed", [
    ("exact", RewardSpec("exact")),
    (" exact ", RewardSpec("exact")),
    (r"regex:-?\d+", RewardSpec("regex", r"-?\d+")),
    ("regex:answer: (\\w+)", RewardSpec("regex", "answer: (\\w+)")),
    ("python:tests.trainer.rl_task:vowel_share", RewardSpec("python", "tests.trainer.rl_task:vowel_share")),
])
def test_parse(spec, parsed):
    assert parse_reward(spec) == parsed
    assert parse_reward(str(parsed)) == parsed  # str() round-trips


@pytest.mark.parametrize("spec, says", [
    ("", "not a reward spec"),
    ("exactly", "not a reward spec"),
    ("exact:x", "not a reward spec"),
    ("regex:", "not a reward spec"),
    ("regex:(", "not a valid regular expression"),
    ("python:score", "python:<module>:<function>"),
    ("python:my-mod:score", "python:<module>:<function>"),
    ("python:mod:not a name", "python:<module>:<function>"),
    ("mod:score", "not a reward spec"),  # a bare module:function is never taken: python: must be explicit
])
def test_parse_refuses(spec, says):
    with pytest.raises(UserError, match=says):
        parse_reward(spec)


@pytest.mark.parametrize("text, normal", [(" 12. ", "12"), ("Paris", "paris"), ("a   b\n", "a b"), ("7", "7")])
def test_normalize(text, normal):
    assert normalize(text) == normal


@pytest.mark.parametrize("completion, answer, reward", [
    ("12", "12", 1.0), (" 12.\n", "12", 1.0), ("The answer is 12.", "12", 0.0), ("13", "12", 0.0), ("", "12", 0.0),
    ("PARIS", "paris", 1.0),
])
def test_exact(completion, answer, reward):
    assert load_reward("exact")("q", completion, answer) == reward


@pytest.mark.parametrize("spec, completion, answer, reward", [
    (r"regex:-?\d+", "The answer is 12.", "12", 1.0),
    (r"regex:-?\d+", "3 + 9 = 12", "12", 0.0),  # the first integer is 3
    (r"regex:-?\d+", "minus -4", "-4", 1.0),
    (r"regex:-?\d+", "no digits", "12", 0.0),
    (r"regex:= (\d+)", "3 + 9 = 12", "12", 1.0),  # a group picks the part compared
    (r"regex:(x)?\d", "5", "5", 0.0),  # an unmatched group counts as no answer
])
def test_regex(spec, completion, answer, reward):
    assert load_reward(spec)("q", completion, answer) == reward


def test_python_reward_is_imported_and_called():
    reward = load_reward("python:tests.trainer.rl_task:vowel_share")
    assert reward("q", "aab", "") == pytest.approx(2 / 3)


@pytest.mark.parametrize("spec, says", [
    ("python:no_such_module_xyz:score", "cannot import 'no_such_module_xyz'"),
    ("python:tests.trainer.rl_task:missing", "has no function 'missing'"),
])
def test_python_reward_errors_name_the_fix(spec, says):
    with pytest.raises(UserError, match=says):
        load_reward(spec)


@pytest.mark.parametrize("value", [None, "1", float("nan"), True])
def test_python_reward_must_return_a_finite_number(monkeypatch, value):
    import tests.trainer.rl_task as task

    monkeypatch.setattr(task, "constant", lambda p, c, a: value, raising=False)
    reward = load_reward("python:tests.trainer.rl_task:constant")
    with pytest.raises(UserError, match="must be a finite number"):
        reward("q", "c", "a")
