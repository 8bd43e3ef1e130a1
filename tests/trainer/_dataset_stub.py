"""Stand-in for planner.dataset until the data layer lands on main (test-only; same contract).

Installed by tests/trainer/conftest.py only when `import planner.dataset` fails.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import types
from dataclasses import dataclass

from planner.errors import UserError


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list
    labels: list
    truncated: bool


def load_rows(source, limit=None):
    with open(source) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


def detect_format(rows):
    if all("messages" in r for r in rows):
        return "chat"
    if all("prompt" in r and "completion" in r for r in rows):
        return "prompt_completion"
    raise UserError("rows need a messages column or prompt and completion columns")


def tokenize_example(tokenizer, row, fmt, max_length):
    if fmt == "chat":
        prompt_text = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        completion_text = row["messages"][-1]["content"]
    else:
        prompt_text, completion_text = row["prompt"], row["completion"]
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion = tokenizer(completion_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) >= max_length:
        raise UserError(f"a prompt of {len(prompt)} tokens reaches max_length={max_length}")
    ids = (prompt + completion)[:max_length]
    labels = ([-100] * len(prompt) + completion)[:max_length]
    return TokenizedExample(ids, labels, len(prompt) + len(completion) > max_length)


def split_rows(rows, eval_fraction, seed):
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * eval_fraction))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def dataset_fingerprint(rows):
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def install_if_missing() -> None:
    try:
        import planner.dataset  # noqa: F401
    except ModuleNotFoundError:
        module = types.ModuleType("planner.dataset")
        for name in ("TokenizedExample", "load_rows", "detect_format", "tokenize_example", "split_rows",
                     "dataset_fingerprint"):
            setattr(module, name, globals()[name])
        sys.modules["planner.dataset"] = module
