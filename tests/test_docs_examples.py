"""The README's and docs/PLANNER.md's `$ lowregret plan ...` examples print what the docs say.

Each example block is run through the real CLI (in-process, from a temporary folder); every line
the docs show must appear in the output, in order: exactly, or as a prefix where the docs cut a
line with "...". A `| python -c ...` pipe is replaced by reading the same key from the JSON.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).parents[1]
DOCS = ("README.md", "docs/PLANNER.md")


def examples() -> list[tuple[str, str, list[str]]]:
    """(doc, command, expected output lines) of every fenced block that starts with `$ ... lowregret plan`."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```\n(.*?)```", (ROOT / doc).read_text(), re.S):
            lines = block.rstrip("\n").split("\n")
            if lines[0].startswith("$ ") and " plan " in f" {lines[0]} " and "lowregret" in lines[0]:
                found.append((doc, lines[0][2:], lines[1:]))
    return found


def _run(command: str, tmp_path: Path, monkeypatch, capsys) -> list[str]:
    command, _, pipe = command.partition(" | ")
    words = shlex.split(command)
    while "=" in words[0]:  # VAR=value prefixes
        key, _, value = words.pop(0).partition("=")
        monkeypatch.setenv(key, value)
    assert words[0] == "lowregret"
    monkeypatch.chdir(tmp_path)
    assert main(words[1:]) == 0
    out = capsys.readouterr().out
    if pipe:  # the docs' one pipe: python -c "...print(json.load(sys.stdin)['KEY'])"
        key = re.search(r"\['(\w+)'\]", pipe).group(1)
        return [str(json.loads(out)[key])]
    return out.splitlines()


def test_the_docs_have_plan_examples():
    assert {doc for doc, _, _ in examples()} == set(DOCS) and len(examples()) >= 3


@pytest.mark.slow  # the dataset example loads a tokenizer and profiles 674 rows (~20-40 s on 2 busy cores)
@pytest.mark.parametrize("command", sorted({command for _, command, _ in examples()}))
def test_plan_examples_print_what_the_docs_show(command, tmp_path, monkeypatch, capsys):
    actual = _run(command, tmp_path, monkeypatch, capsys)
    for doc, _, expected in (e for e in examples() if e[1] == command):
        position = 0
        for line in expected:
            prefix = line[:-3] if line.endswith("...") else None
            for i in range(position, len(actual)):
                if actual[i] == line or (prefix is not None and actual[i].startswith(prefix)):
                    position = i + 1
                    break
            else:
                pytest.fail(f"{doc}: `{command}` no longer prints (in this order):\n{line}\n\nIt prints:\n"
                            + "\n".join(actual))
