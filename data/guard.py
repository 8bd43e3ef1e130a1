"""The one reader guard: limits on what LowRegret reads from a user's disk, and the checked JSON
reader every file kind goes through (datasets, run files, checkpoint state, configs).

A hostile or damaged file is refused in one paragraph (`UserError`: exit 2) before the work it would
blow up: a 50 MB one-line JSONL, JSON nested 200,000 deep, a lone UTF-16 surrogate, a YAML alias
bomb, a conversation of 10,000 turns. Each limit is documented in docs/RELIABILITY.md and can be
raised with an environment variable, `LOWREGRET_LIMIT_<NAME>` (a positive integer), for the rare
real dataset that needs more:

| name | default | what |
|---|---|---|
| `row_bytes` | 16 MiB | one dataset row: a JSONL line, a CSV field, the text in a row |
| `json_depth` | 64 | nesting of any JSON value read (a chat row is 3 deep) |
| `turns` | 1024 | messages in one conversation (rendering grows with turns²) |
| `yaml_bytes` | 1 MiB | a config file |
| `yaml_nodes` | 100,000 | values in a config once its aliases are expanded |
| `file_bytes` | 512 MiB | a run or state file (summary, curves, scores, checkpoint state), a .json dataset read whole |
| `template_s` | 2 | seconds one row's chat-template rendering may take (data/render.py) |
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from data.errors import UserError

DEFAULTS = {
    "row_bytes": 16 * 2**20,
    "json_depth": 64,
    "turns": 1024,
    "yaml_bytes": 2**20,
    "yaml_nodes": 100_000,
    "file_bytes": 512 * 2**20,
    "template_s": 2,
}
_SURROGATE = re.compile("[\ud800-\udfff]")


def limit(name: str) -> int:
    """The limit `name` (DEFAULTS), or its `LOWREGRET_LIMIT_<NAME>` override.

    Raises:
        UserError: the override is not a positive integer.
    """
    variable = f"LOWREGRET_LIMIT_{name.upper()}"
    value = os.environ.get(variable)
    if value is None:
        return DEFAULTS[name]
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{variable}={value!r}: a limit is a positive whole number (the default is {DEFAULTS[name]}).")
    return int(value)


def over(name: str, what: str, size: int, fix: str) -> UserError:
    """The refusal of `what` (of `size`) over limit `name`."""
    return UserError(f"{what} is {size:,}, over the limit of {limit(name):,} ({name}; raise it with "
                     f"LOWREGRET_LIMIT_{name.upper()}=N if this is intended): {fix}")


def check_value(value, where: str, fix: str, *, text_limit: str = "row_bytes") -> None:
    """Refuse a value read from JSON or YAML whose nesting, text size or text is hostile: deeper than
    `json_depth`, more text than `row_bytes` characters, or a lone UTF-16 surrogate (valid JSON,
    `"\\ud800"`, that no UTF-8 encoder or tokenizer takes). Iterative: never a RecursionError.

    Raises:
        UserError: naming `where`, with `fix`.
    """
    max_depth, max_chars = limit("json_depth"), limit(text_limit)
    chars = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            chars += len(item)
            if not item.isascii() and _SURROGATE.search(item):  # isascii: a flag, no scan
                raise UserError(f"{where}: holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text: {fix}")
        elif isinstance(item, dict | list | tuple):
            if depth > max_depth:
                raise over("json_depth", f"{where}: the nesting depth", depth, fix)
            children = item.values() if isinstance(item, dict) else item
            if isinstance(item, dict):
                chars += sum(len(k) for k in item if isinstance(k, str))
            stack.extend((child, depth + 1) for child in children)
        if chars > max_chars:
            raise over(text_limit, f"{where}: its text", chars, fix)


def loads(text: str, where: str, fix: str, *, text_limit: str | None = "row_bytes"):
    """`json.loads` of `text`, checked (`check_value`; `text_limit` None: the caller checks the parts).

    Raises:
        UserError: not JSON (with the position), too deeply nested for the decoder, or refused by
            `check_value`; naming `where`, with `fix`.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): {fix}") from None
    except RecursionError:
        raise over("json_depth", f"{where}: the nesting depth", 10**4, fix) from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits (Python's int_max_str_digits)
        raise UserError(f"{where}: a value JSON cannot be read here ({str(exc)[:120]}): {fix}") from None
    if text_limit is not None:
        check_value(value, where, fix, text_limit=text_limit)
    return value


def read_json(path: str | Path, fix: str, *, what: str | None = None, text_limit: str | None = "file_bytes"):
    """The checked JSON value of the file at `path` (at most `file_bytes`, UTF-8, `loads`).

    Raises:
        UserError: missing, unreadable, too big, not UTF-8 or not JSON; naming the file, with `fix`.
    """
    path = Path(path)
    where = what or str(path)
    try:
        size = path.stat().st_size
        if size > limit("file_bytes"):
            raise over("file_bytes", f"{where}: the file", size, fix)
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 text ({exc.reason}): {fix}") from None
    except OSError as exc:
        raise UserError(f"{where}: cannot be read ({exc.strerror or exc}): {fix}") from None
    return loads(text, where, fix, text_limit=text_limit)
