"""Training data: load rows, check their format, tokenize with a completion-only label mask,
split and fingerprint.

Two row formats (the ones TRL and most SFT datasets use):
- chat: `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}`;
  every assistant turn is trained.
- prompt/completion: `{"prompt": str, "completion": str}`; the completion is trained.

`datasets` and `pyarrow` are imported only where a Hub id, a `save_to_disk` directory or a
Parquet file needs them, so JSONL, CSV and the built-ins load with the standard library alone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from planner.builtin_datasets import is_builtin, load_builtin
from planner.errors import UserError

Format = Literal["chat", "prompt_completion"]
IGNORE_INDEX = -100  # the label torch's cross_entropy ignores (its default ignore_index)
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")
_EXPECTED_COLUMNS = (
    "Expected either a `messages` column (a list of {role, content} with at least one "
    "assistant turn) or `prompt` and `completion` string columns."
)


@dataclass(frozen=True)
class TokenizedExample:
    """One example ready for a causal LM.

    Attributes:
        input_ids: token ids, at most `max_length` of them.
        labels: same length; the token id where the token is trained, `IGNORE_INDEX` (-100)
            elsewhere. Not shifted: the model shifts labels by one when computing the loss.
        truncated: True when tokens were cut from the right to fit `max_length`.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_rows(source: str, limit: int | None = None) -> list[dict]:
    """Rows of a dataset as plain dicts.

    Args:
        source: a `.jsonl`, `.json`, `.parquet` or `.csv` file; a directory written by
            `datasets.Dataset.save_to_disk` (a `DatasetDict` gives its `train` split); a Hub
            dataset id `org/name` or `org/name:split` (default split `train`); or a built-in,
            `builtin:pydoc` / `builtin:facts` with options as a query string
            (`builtin:facts?n_facts=2000&choices=16&seed=0`).
        limit: keep at most the first `limit` rows.

    Raises:
        UserError: missing file, unsupported file type, unreadable content, a Hub id that cannot
            be reached, an unknown built-in or option.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer or None, got {limit!r}.")
    if is_builtin(source):
        rows = load_builtin(source)
    elif Path(source).is_dir():
        rows = _load_saved_dataset(Path(source), limit)
    elif Path(source).is_file():
        rows = _load_file(Path(source), limit)
    elif Path(source).suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(f"Dataset file {source!r} not found: check the path.")
    elif _HUB_ID.match(source):
        rows = _load_hub(source, limit)
    else:
        raise UserError(
            f"Cannot tell what dataset {source!r} is: pass a local {'/'.join(FILE_SUFFIXES)} file, "
            f"a directory saved with datasets' save_to_disk, a Hub id `org/name[:split]`, or "
            f"builtin:pydoc / builtin:facts."
        )
    return rows if limit is None else rows[:limit]


def check_local_file(source: str) -> None:
    """Read and format-check `source` now if it is a local file (cheap), so a bad file fails before
    a tokenizer or a model is loaded; Hub ids, folders and built-ins are checked when they are read.

    Raises:
        UserError: unreadable, non-UTF-8, malformed or empty file (see `load_rows`, `detect_format`).
    """
    if Path(source).is_file():
        detect_format(load_rows(source), source=source)


def _load_file(path: Path, limit: int | None) -> list[dict]:
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_json_lines, ".json": _read_json, ".csv": _read_csv}
    if suffix in readers:
        try:
            return readers[suffix](path, limit)
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{path} is not UTF-8 text ({exc.reason}): JSON Lines, JSON and CSV datasets are read as "
                "UTF-8. Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
            ) from exc
    if suffix == ".parquet":
        return _read_parquet(path, limit)
    raise UserError(
        f"Unsupported dataset file type {path.suffix!r} ({path}): use one of "
        f"{', '.join(FILE_SUFFIXES)}, or a directory saved with datasets' save_to_disk."
    )


def _read_json_lines(path: Path, limit: int | None) -> list[dict]:
    rows: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}, line {line_no}: not valid JSON ({exc.msg}). Each line "
                    f"of a .jsonl file must be one JSON object."
                ) from exc
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}.")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _read_json(path: Path, limit: int | None) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
        # `datasets`' to_json writes JSON Lines under a .json name by default.
        return _read_json_lines(path, limit)
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]}
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON list of objects (or JSON Lines), one per example.")
    return data


def _read_csv(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            # A CSV cell is text: a `messages` column is accepted as the JSON of the list.
            if isinstance(row.get("messages"), str) and row["messages"].lstrip().startswith("["):
                try:
                    row["messages"] = json.loads(row["messages"])
                except json.JSONDecodeError as exc:
                    raise UserError(
                        f"{path}, row {len(rows)}: the `messages` cell is not valid JSON ({exc.msg})."
                    ) from exc
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _read_parquet(path: Path, limit: int | None) -> list[dict]:
    import pyarrow.parquet as pq  # installed with `datasets`

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({exc}).") from exc
    rows: list[dict] = []
    for batch in parquet.iter_batches():
        rows.extend(batch.to_pylist())
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _load_saved_dataset(path: Path, limit: int | None) -> list[dict]:
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise UserError(
            f"{path} is a directory but not one written by datasets' save_to_disk (no "
            f"state.json or dataset_dict.json): pass a data file inside it instead."
        )
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(
                f"{path} holds splits {sorted(loaded)} but no `train` split: save the "
                f"split to train on with Dataset.save_to_disk."
            )
        loaded = loaded["train"]
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    return loaded.to_list()


def _load_hub(source: str, limit: int | None) -> list[dict]:
    name, _, split = source.partition(":")
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # offline, missing, gated, bad split: all mean "could not load"
        raise UserError(
            f"The Hub dataset {source!r} could not be reached or loaded ({type(exc).__name__}: "
            f"{exc}). Without network access pass a local .jsonl/.parquet file or a "
            f"builtin: dataset instead."
        ) from exc
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    return loaded.to_list()


# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------


def detect_format(rows: list[dict], *, source: str | None = None) -> Format:
    """`"chat"` or `"prompt_completion"`, after checking every row has that shape.

    Args:
        rows: the dataset's rows.
        source: where the rows came from, named in error messages.

    Raises:
        UserError: empty dataset, unknown columns, both formats' columns at once, or a row with
            the wrong types or no assistant turn; names the row and the expected columns.
    """
    where = f"Dataset {source!r}" if source else "The dataset"
    if not rows:
        raise UserError(f"{where} has no examples. {_EXPECTED_COLUMNS}")
    first = rows[0]
    if not isinstance(first, dict):
        raise UserError(f"{where}, row 0: expected an object with named columns, got {type(first).__name__}.")
    has_chat = "messages" in first
    has_pc = "prompt" in first and "completion" in first
    if has_chat and has_pc:
        raise UserError(
            f"{where} has both `messages` and `prompt`/`completion` columns: keep one "
            f"format so it is clear what is trained."
        )
    if not (has_chat or has_pc):
        raise UserError(f"{where} has columns {sorted(first)}. {_EXPECTED_COLUMNS}")
    fmt: Format = "chat" if has_chat else "prompt_completion"
    for index, row in enumerate(rows):
        _check_row(row, fmt, f"{where}, row {index}")
    return fmt


def _check_row(row, fmt: Format, at: str) -> None:
    """Raise a UserError, starting with `at` (which row), if `row` is not in format `fmt`."""
    if not isinstance(row, dict):
        raise UserError(f"{at}: expected an object with named columns, got {type(row).__name__}.")
    if fmt == "prompt_completion":
        for column in ("prompt", "completion"):
            if not isinstance(row.get(column), str):
                raise UserError(
                    f"{at}: `{column}` must be a string, got {type(row.get(column)).__name__}. "
                    f"{_EXPECTED_COLUMNS}"
                )
        if not row["completion"]:
            raise UserError(f"{at}: the completion is empty, so there is nothing to learn: drop the row.")
        return
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(
            f"{at}: `messages` must be a non-empty list of {{role, content}} objects. {_EXPECTED_COLUMNS}"
        )
    for turn, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise UserError(
                f'{at}, message {turn}: expected {{"role": str, "content": str}}, got {message!r:.80}.'
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(
            f"{at}: no assistant turn, so there is nothing to learn. Each conversation "
            f'needs at least one message with role "assistant".'
        )


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------


def tokenize_example(
    tokenizer, row: dict, fmt: Format, max_length: int, *, row_index: int | None = None
) -> TokenizedExample:
    """Token ids and completion-only labels for one row.

    Chat rows are rendered with the tokenizer's chat template; the trained tokens are each
    assistant turn (its text from the end of the generation prompt, e.g. `<|im_start|>assistant\\n`,
    to the end of its content) plus the special token that closes the turn (`<|im_end|>`,
    `<|eot_id|>`, ...). Prompt/completion rows are the prompt (with the tokenizer's own special
    tokens, e.g. BOS), the completion and EOS; completion and EOS are trained.

    Text is tokenized piece by piece (prompt parts and completion parts separately, with
    `add_special_tokens=False` for template text), so a token never straddles a label boundary
    and the prompt is tokenized exactly as at generation time, when it ends at the generation
    prompt.

    Args:
        tokenizer: a Hugging Face tokenizer.
        row: one row in format `fmt`.
        fmt: `"chat"` or `"prompt_completion"` (see `detect_format`).
        max_length: keep the first `max_length` tokens.
        row_index: the row's index, named in error messages.

    Raises:
        UserError: a chat row and a tokenizer without a chat template; a template whose rendering
            of a conversation prefix is not a prefix of the whole conversation; a prompt that
            alone fills `max_length`.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"max_length must be a positive integer, got {max_length!r}.")
    at = f"Row {row_index}" if row_index is not None else "A row"
    _check_row(row, fmt, at)
    if fmt == "chat":
        pieces = [
            (_encode(tokenizer, text), trained)
            for text, trained in _chat_pieces(tokenizer, row["messages"], at)
        ]
    else:
        pieces = _prompt_completion_pieces(tokenizer, row)
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in pieces:
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    truncated = len(input_ids) > max_length
    first_trained = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first_trained is None:
        raise UserError(
            f"{at}: the assistant turns are empty and the chat template closes them with no "
            f"special token, so there is nothing to train: drop the row."
        )
    if first_trained >= max_length:
        raise UserError(
            f"{at}: the prompt alone is {first_trained} tokens, which fills max_length={max_length}, so "
            f"no completion token would be trained. Raise max_length (to at least "
            f"{first_trained + 1}, better more) or shorten the prompt."
        )
    return TokenizedExample(input_ids[:max_length], labels[:max_length], truncated)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _prompt_completion_pieces(tokenizer, row: dict) -> list[tuple[list[int], bool]]:
    if tokenizer.eos_token_id is None:
        raise UserError(
            "The tokenizer has no EOS token, so a completion's end cannot be trained: "
            "use a model's own tokenizer."
        )
    prompt_ids = tokenizer(row["prompt"])["input_ids"] if row["prompt"] else []
    return [(prompt_ids, False), (_encode(tokenizer, row["completion"]) + [tokenizer.eos_token_id], True)]


def _render(tokenizer, messages: list[dict], at: str, *, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja2 TemplateError and friends: the template rejected the turns
        raise UserError(
            f"{at}: the tokenizer's chat template failed on this conversation ({exc}). "
            f"Check the roles and their order."
        ) from exc


def _special_strings(tokenizer) -> list[str]:
    """Special-token strings, longest first, to recognise the token that closes a turn."""
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((s for s in specials if s), key=len, reverse=True)


def _chat_pieces(tokenizer, messages: list[dict], at: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces.

    The start of assistant turn i is found by rendering messages[:i] with the generation prompt
    and checking it is a prefix of the whole rendering (true for ChatML, Llama 3, Gemma, Mistral
    templates); the end is the turn's content (searched for, as templates may trim it) plus a
    special token that directly follows it, after optional whitespace. A conversation that opens
    with the assistant trains that turn's content and closing token only.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "The tokenizer has no chat template, so chat (`messages`) rows cannot be rendered: use "
            "prompt/completion rows, or a model whose tokenizer has a chat template."
        )
    full = _render(tokenizer, messages, at, add_generation_prompt=False)
    specials = _special_strings(tokenizer)
    spans: list[tuple[int, int]] = []
    position = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"].strip()
        if i == 0:
            # transformers refuses to render an empty conversation, so an opening assistant turn
            # has no generation prompt to measure: its content is the last occurrence of the text
            # in the rendering of that one message (header and default system prompt untrained).
            if not content:
                continue  # an empty opening turn teaches nothing, and has nothing to anchor on
            opening = _render(tokenizer, messages[:1], at, add_generation_prompt=False)
            start = opening.rfind(content) if full.startswith(opening) else -1
            span_start = start
        else:
            prefix = _render(tokenizer, messages[:i], at, add_generation_prompt=True)
            if not full.startswith(prefix) or len(prefix) < position:
                raise UserError(
                    f"{at}: the chat template renders the conversation up to assistant message {i} "
                    f"differently from the whole conversation, so its tokens cannot be located. Use "
                    f"prompt/completion rows, or split the conversation so it ends at that turn."
                )
            start = full.find(content, len(prefix))
            span_start = len(prefix)
        if start < 0:
            raise UserError(
                f"{at}: the chat template dropped or rewrote the content of assistant message {i}; "
                f"use prompt/completion rows for this data."
            )
        end = start + len(content)
        gap = len(full[end:]) - len(full[end:].lstrip())
        closing = next((s for s in specials if full.startswith(s, end + gap)), None)
        if closing is not None:
            end += gap + len(closing)
        spans.append((span_start, end))
        position = end
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for start, end in spans:
        pieces += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    pieces.append((full[cursor:], False))
    return [(text, trained) for text, trained in pieces if text]


# ---------------------------------------------------------------------------------------------
# Split and fingerprint
# ---------------------------------------------------------------------------------------------


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/eval split.

    The row indices are shuffled with `random.Random(seed)`; the first round(n·eval_fraction)
    (at least 1 when eval_fraction > 0 and n ≥ 2, at most n − 1) go to eval. Each part keeps the
    rows' original order.

    Raises:
        UserError: eval_fraction outside [0, 1).
    """
    if (
        isinstance(eval_fraction, bool)
        or not isinstance(eval_fraction, (int, float))
        or not 0 <= eval_fraction < 1
    ):
        raise UserError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}.")
    n = len(rows)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    eval_idx = set(order[:n_eval])
    train = [row for i, row in enumerate(rows) if i not in eval_idx]
    held_out = [row for i, row in enumerate(rows) if i in eval_idx]
    return train, held_out


def dataset_fingerprint(rows: list[dict]) -> str:
    """First 16 hex chars of the sha256 of the rows' canonical JSON (sorted keys, compact).

    Values JSON cannot hold (dates from Parquet, ...) are written with `str`.
    """
    canonical = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
