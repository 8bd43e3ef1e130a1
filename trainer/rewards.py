"""Verifiable rewards for RL: a score for each sampled completion, computed from the row's answer.

A reward spec is a string the user gives in the RL config or on the command line, never in a data
file:

- `exact`: 1.0 when the completion equals the answer after `normalize` (surrounding whitespace,
  a trailing period, letter case and runs of spaces do not count), else 0.0.
- `regex:<pattern>`: 1.0 when the first match of `pattern` in the completion (its first group if
  it has groups) equals the answer after `normalize`, else 0.0. `regex:-?\\d+` scores the first
  integer of the completion.
- `python:<module>:<function>`: `function(prompt, completion, answer) -> float` from an importable
  module (on `sys.path`, e.g. through `PYTHONPATH`). This runs the user's code, by design: it is the
  only spec that does, it needs the explicit `python:` prefix, and the module is imported when the
  run is set up, before any training.

`exact` and `regex` are pass/fail: at most 1 bit per episode, the reward entropy the planner's RL
capacity verdict assumes (`planner.profile.profile_rl`). A `python:` reward with more values
carries up to log2(values) bits; plan it with `lowregret plan --reward-entropy-bits`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from data.errors import UserError

REWARD_KINDS = ("exact", "regex", "python")
#: A held-out prompt counts as solved (accuracy) when its greedy completion earns at least this.
SOLVED_REWARD = 1.0

RewardFn = Callable[[str, str, str], float]


@dataclass(frozen=True)
class RewardSpec:
    """A parsed reward spec: `kind` is exact | regex | python; `argument` the pattern or module:function."""

    kind: str
    argument: str = ""

    def __str__(self) -> str:
        return self.kind if self.kind == "exact" else f"{self.kind}:{self.argument}"

    @property
    def binary(self) -> bool:
        """Pass/fail (0 or 1): at most 1 bit per episode."""
        return self.kind in ("exact", "regex")


def parse_reward(spec: str) -> RewardSpec:
    """Parse `exact`, `regex:<pattern>` or `python:<module>:<function>`; nothing is imported here.

    Raises:
        UserError: an unknown kind, an empty or invalid pattern, a malformed module:function.
    """
    kind, sep, argument = str(spec).strip().partition(":")
    if kind == "exact" and not sep:
        return RewardSpec("exact")
    if kind == "regex" and argument:
        try:
            re.compile(argument)
        except re.error as exc:
            raise UserError(f"reward={spec!r}: {argument!r} is not a valid regular expression ({exc}).") from None
        return RewardSpec("regex", argument)
    if kind == "python":
        module, _, function = argument.rpartition(":")
        if module and function.isidentifier() and all(p.isidentifier() for p in module.split(".")):
            return RewardSpec("python", argument)
        raise UserError(
            f"reward={spec!r}: a Python reward is python:<module>:<function>, e.g. python:my_rewards:score, "
            "with the module importable (on PYTHONPATH)."
        )
    raise UserError(
        f"reward={spec!r} is not a reward spec. Use exact, regex:<pattern> (e.g. regex:-?\\d+ for the first "
        "integer) or python:<module>:<function> (runs your code: function(prompt, completion, answer) -> float)."
    )


def normalize(text: str) -> str:
    """Case-folded, whitespace-collapsed, without surrounding whitespace or a trailing period."""
    return " ".join(str(text).split()).rstrip(".").strip().casefold()


def load_reward(spec: str | RewardSpec) -> RewardFn:
    """The reward function of a spec. `python:` specs import the user's module here.

    Raises:
        UserError: the spec is malformed, or the module cannot be imported, or has no such callable.
    """
    spec = spec if isinstance(spec, RewardSpec) else parse_reward(spec)
    if spec.kind == "exact":
        return _exact
    if spec.kind == "regex":
        return _regex_reward(re.compile(spec.argument))
    module_name, _, function_name = spec.argument.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"reward=python:{spec.argument}: cannot import {module_name!r} ({exc}). Put its folder on "
            "PYTHONPATH (or install it) and check the spelling."
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"reward=python:{spec.argument}: {module_name} has no function {function_name!r}.")
    return _checked(function, str(spec))


def _exact(prompt: str, completion: str, answer: str) -> float:
    return float(normalize(completion) == normalize(answer))


def _regex_reward(pattern: re.Pattern) -> RewardFn:
    def reward(prompt: str, completion: str, answer: str) -> float:
        match = pattern.search(completion)
        if match is None:
            return 0.0
        found = match.group(1) if pattern.groups else match.group(0)
        return float(found is not None and normalize(found) == normalize(answer))

    return reward


def _checked(function: Callable, name: str) -> RewardFn:
    """Wrap a user's reward so a non-number or non-finite value is a UserError naming the spec."""

    def reward(prompt: str, completion: str, answer: str) -> float:
        value = function(prompt, completion, answer)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(
                f"reward={name} returned {value!r} for completion {completion[:80]!r}: a reward must be a finite "
                "number (1.0 for a correct answer, so that accuracy counts it)."
            )
        return float(value)

    return reward
