"""Training data: load rows, check their format and fingerprint them (rendering and tokenizing is
data/render.py, the held-out split data/split.py).

Five row formats, detected from the columns (`detect_format`):
- chat (TRL): `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}`;
  every assistant turn is trained.
- prompt_completion (TRL): `{"prompt": str, "completion": str}`; the completion is trained.
- alpaca (Axolotl, LLaMA-Factory): `{"instruction": str, "input": str, "output": str}`, read as a
  user turn and an assistant turn; the output is trained.
- sharegpt (Axolotl, LLaMA-Factory): `{"conversations": [{"from": "human" | "gpt" | "system",
  "value": str}, ...]}`, read as chat; every gpt turn is trained.
- text (continued pre-training): `{"text": str}`; every token is trained.

`datasets` and `pyarrow` are imported only where a Hub id, a `save_to_disk` directory or a
Parquet file needs them, so JSONL, CSV and the built-ins load with the standard library alone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data import guard
from data.builtin_datasets import is_builtin, load_builtin
from data.errors import UserError

Format = Literal["chat", "prompt_completion", "alpaca", "sharegpt", "text"]
IGNORE_INDEX = -100  # the label torch's cross_entropy ignores (its default ignore_index)
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")


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


def load_rows(source: str, limit: int | None = None, columns: dict | None = None) -> list[dict]:
    """Rows of a dataset as plain dicts, with `columns` renamed (`apply_columns`).

    Args:
        source: a `.jsonl`, `.json`, `.parquet` or `.csv` file; a directory written by
            `datasets.Dataset.save_to_disk` (a `DatasetDict` gives its `train` split); a Hub
            dataset id `org/name` or `org/name:split` (default split `train`); or a built-in,
            `builtin:pydoc` / `builtin:facts` with options as a query string
            (`builtin:facts?n_facts=2000&choices=16&seed=0`).
        limit: keep at most the first `limit` rows.
        columns: {column the format reads: column of the data}, e.g. {"prompt": "question",
            "completion": "answer"} (`apply_columns`); None = the data's own names.

    Raises:
        UserError: missing file, unsupported file type, unreadable content, a Hub id that cannot
            be reached, an unknown built-in or option, a mapping naming a column the data lacks.
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
    rows = rows if limit is None else rows[:limit]
    if not is_builtin(source):  # ours are known to be fine; every other source goes through the guard
        fix = "fix or drop the row (docs/RELIABILITY.md, limits)."
        for i, row in enumerate(rows):
            guard.check_value(row, f"{source}, row {i}", fix)
    return rows if not columns else apply_columns(rows, columns, source)


# Columns a format reads (the first ones required, `FORMAT_COLUMNS`), and RL's prompt/answer rows.
READ_COLUMNS = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "system"),
    "text": ("text",),
}
RL_COLUMNS = ("prompt", "answer")  # what an RL row holds (trainer/rl.py)
MAPPABLE_COLUMNS = tuple(sorted({c for cs in READ_COLUMNS.values() for c in cs} | set(RL_COLUMNS)))
# Column names that, in datasets as they ship, usually hold what a format column holds: for the
# suggestion a refusal makes (never applied without the user's mapping).
_LIKELY_SOURCES = {
    "prompt": ("question", "query", "problem", "prompt_text", "source", "input_text", "context"),
    "completion": ("answer", "response", "output", "solution", "canonical_solution", "target", "reply",
                   "completion_text", "chosen"),
    "messages": ("conversation", "conversations_openai", "dialogue", "dialog", "turns", "chat"),
    "text": ("content", "document", "body", "passage", "article"),
}


def check_columns(columns, option: str = "columns") -> dict | None:
    """A validated column mapping (None or {} = none).

    Raises:
        UserError: not a mapping of format column names to data column names.
    """
    if columns is None or columns == {}:
        return None
    syntax = (f"{option} maps the names a format reads to your data's, e.g. "
              f"{option}: {{prompt: question, completion: answer}} (YAML) or {option}.completion=answer")
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                               for k, v in columns.items()):
        raise UserError(f"{option}={columns!r}: {syntax}.")
    unknown = sorted(set(columns) - set(MAPPABLE_COLUMNS))
    if unknown:
        raise UserError(f"{option}: {', '.join(unknown)} is not a column any format reads "
                        f"({', '.join(MAPPABLE_COLUMNS)}). {syntax}.")
    sources = list(columns.values())
    if len(set(sources)) < len(sources):
        raise UserError(f"{option}={columns!r}: one data column is mapped to two names; map each once.")
    return dict(columns)


def apply_columns(rows: list[dict], columns: dict, source: str) -> list[dict]:
    """Each row with `columns[name]` read as `name` (the mapped-from column dropped, so two formats'
    columns do not clash); every other column is kept as is (the format reads what it needs, and
    `ignored_columns` says what it does not).

    Raises:
        UserError: a mapped-from column the first row lacks (the message lists the data's columns).
    """
    columns = check_columns(columns)
    if not rows or not columns:
        return rows
    first = rows[0] if isinstance(rows[0], dict) else {}
    missing = sorted(v for v in columns.values() if v not in first)
    if missing:
        raise UserError(
            f"Dataset {source!r}: the column mapping names {', '.join(map(repr, missing))}, which the data lacks; "
            f"its columns are {sorted(first)}."
        )
    renamed = []
    for row in rows:
        if not isinstance(row, dict):
            renamed.append(row)
            continue
        out = {k: v for k, v in row.items() if k not in columns.values() and k not in columns}
        out.update({name: row.get(column) for name, column in columns.items()})
        renamed.append(out)
    return renamed


def ignored_columns(row: dict, fmt: str) -> list[str]:
    """The row's columns format `fmt` does not read (RL reads `prompt` and `answer`)."""
    return sorted(set(row) - set(READ_COLUMNS[fmt]))


def suggest_columns(columns: list[str]) -> dict | None:
    """A mapping the column names make likely (e.g. {"completion": "canonical_solution"} for a code set
    with `prompt` and `canonical_solution`), or None: only names in `_LIKELY_SOURCES` are proposed."""
    present = set(columns)
    for fmt in ("prompt_completion", "chat", "text"):
        need = FORMAT_COLUMNS[fmt]
        mapping = {}
        for name in need:
            if name in present:
                continue
            found = next((c for c in _LIKELY_SOURCES.get(name, ()) if c in present), None)
            if found is None:
                break
            mapping[name] = found
        else:
            if mapping:
                return mapping
    return None


def check_local_file(source: str, columns: dict | None = None) -> None:
    """Read and format-check `source` now if it is a local file (cheap), so a bad file fails before
    a tokenizer or a model is loaded; Hub ids, folders and built-ins are checked when they are read.

    Raises:
        UserError: unreadable, non-UTF-8, malformed or empty file (see `load_rows`, `detect_format`).
    """
    if Path(source).is_file():
        detect_format(load_rows(source, columns=columns), source=source)


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
    max_line = guard.limit("row_bytes")
    with path.open(encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is read as nothing
        for line_no, line in enumerate(iter(lambda: f.readline(max_line + 1), ""), start=1):
            if len(line) > max_line:  # read no further than the limit: a 5 GB line is refused, not loaded
                raise guard.over("row_bytes", f"{path}, line {line_no}: the line", len(line),
                                 "split the text into several rows.")
            if not line.strip():
                continue
            row = guard.loads(line, f"{path}, line {line_no}", "each line of a .jsonl file must be one JSON object.",
                              text_limit=None)
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}.")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _read_json(path: Path, limit: int | None) -> list[dict]:
    size = path.stat().st_size
    if size > guard.limit("file_bytes"):
        raise guard.over("file_bytes", f"{path}: a .json dataset is read whole, and the file", size,
                         "save it as JSON Lines (.jsonl), which is read line by line.")
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
        # `datasets`' to_json writes JSON Lines under a .json name by default.
        return _read_json_lines(path, limit)
    except RecursionError:
        raise guard.over("json_depth", f"{path}: the nesting depth", 10**4, "a dataset row is a flat JSON object.") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise UserError(f"{path}: a value JSON cannot be read here ({str(exc)[:120]}).") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]}
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON list of objects (or JSON Lines), one per example.")
    return data


def _read_csv(path: Path, limit: int | None) -> list[dict]:
    rows = []
    csv.field_size_limit(guard.limit("row_bytes"))
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for row in _csv_rows(reader, path):
            if None in row:  # DictReader's key for fields beyond the header
                raise UserError(f"{path}, line {reader.line_num}: {len(row[None])} more field(s) than the header's "
                                f"{len(reader.fieldnames)} columns: quote cells that hold commas, or fix the row.")
            if None in row.values():
                raise UserError(f"{path}, line {reader.line_num}: fewer fields than the header's "
                                f"{len(reader.fieldnames)} columns: fix the row.")
            # A CSV cell is text: a list column (`messages`, `conversations`) is accepted as its JSON.
            for column in ("messages", "conversations"):
                if isinstance(row.get(column), str) and row[column].lstrip().startswith("["):
                    row[column] = guard.loads(row[column], f"{path}, row {len(rows)}, the `{column}` cell",
                                              "a list cell holds the JSON of the list.")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _csv_rows(reader, path: Path):
    """The rows of a csv reader, its errors (a field over the limit, a NUL byte) as UserError."""
    try:
        yield from reader
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise guard.over("row_bytes", f"{path}, line {reader.line_num}: a field", guard.limit("row_bytes") + 1,
                             "split the text into several rows.") from None
        raise UserError(f"{path}, line {reader.line_num}: not readable CSV ({exc}).") from None


def _read_parquet(path: Path, limit: int | None) -> list[dict]:
    import pyarrow.parquet as pq  # installed with `datasets`

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({exc}).") from exc
    rows: list[dict] = []
    try:
        for batch in parquet.iter_batches():
            rows.extend(batch.to_pylist())
            if limit is not None and len(rows) >= limit:
                break
    except Exception as exc:  # a corrupt page or column chunk: pyarrow's OSError / ArrowInvalid
        raise UserError(f"{path}: damaged Parquet data after row {len(rows)} ({exc}): re-export the file.") from None
    return rows


def _load_saved_dataset(path: Path, limit: int | None) -> list[dict]:
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise UserError(
            f"{path} is a directory but not one written by datasets' save_to_disk (no "
            f"state.json or dataset_dict.json): pass a data file inside it instead."
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # a damaged state.json / dataset_info.json / arrow file, in any of their ways
        raise UserError(f"{path}: a damaged save_to_disk folder ({type(exc).__name__}: {str(exc)[:200]}): save "
                        "the dataset again with Dataset.save_to_disk.") from None
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


def _hub_split(source: str):
    """The `datasets.Dataset` of a Hub id `org/name[:split]` (memory-mapped from the datasets cache once
    downloaded).

    Raises:
        UserError: offline, missing, gated or a bad split.
    """
    name, _, split = source.partition(":")
    import datasets

    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # offline, missing, gated, bad split: all mean "could not load"
        raise UserError(
            f"The Hub dataset {source!r} could not be reached or loaded ({type(exc).__name__}: "
            f"{exc}). Without network access pass a local .jsonl/.parquet file or a "
            f"builtin: dataset instead."
        ) from exc


def hub_fingerprint(source: str) -> str | None:
    """The content fingerprint `datasets` keeps for a Hub id's split (no row is read), or None when
    `source` is not a Hub id. What lets the token cache find a Hub dataset it has tokenized before.

    Raises:
        UserError: a Hub id that cannot be loaded.
    """
    if (is_builtin(source) or Path(source).exists() or Path(source).suffix.lower() in FILE_SUFFIXES
            or source.startswith((".", "/", "~")) or not _HUB_ID.match(source)):
        return None  # what load_rows reads as something else, or refuses with its own message
    return getattr(_hub_split(source), "_fingerprint", None)


def _load_hub(source: str, limit: int | None) -> list[dict]:
    loaded = _hub_split(source)
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    return loaded.to_list()


# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------

# What identifies each format: the columns of its first row. Structured formats win over `text`
# (Alpaca exports often carry a pre-rendered `text` column beside instruction/output).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "text": ("text",),
}
FORMATS: tuple[str, ...] = tuple(FORMAT_COLUMNS)
# What each format looks like and what is trained, for messages and docs.
FORMAT_SHAPES = {
    "chat": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
            " (every assistant turn trained)",
    "prompt_completion": '{"prompt": "...", "completion": "..."} (the completion trained)',
    "alpaca": '{"instruction": "...", "input": "", "output": "..."} (the output trained)',
    "sharegpt": '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}'
                " (every gpt turn trained)",
    "text": '{"text": "..."} (continued pre-training: every token trained)',
}
# ShareGPT speakers (LLaMA-Factory / Axolotl defaults) and the chat roles they become.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CONVERSATION_FORMATS = ("chat", "alpaca", "sharegpt")  # rendered with the tokenizer's chat template


def describe_format(fmt: str) -> str:
    """`alpaca (instruction/input/output → user/assistant turns)`: the format and how it is read."""
    how = {
        "chat": "messages, every assistant turn trained",
        "prompt_completion": "prompt/completion, the completion trained",
        "alpaca": "instruction/input/output as a user/assistant turn, the output trained",
        "sharegpt": "conversations of human/gpt turns, every gpt turn trained",
        "text": "plain text, every token trained",
    }[fmt]
    return f"{fmt} ({how})"


def detect_format(rows: list[dict], *, source: str | None = None) -> Format:
    """The rows' format, after checking every row has that shape.

    Formats, by the first row's columns: `messages` → chat; `prompt` + `completion` →
    prompt_completion; `instruction` + `output` → alpaca; `conversations` → sharegpt; `text`
    alone → text (a `text` column beside another format's columns is ignored).

    Args:
        rows: the dataset's rows.
        source: where the rows came from, named in error messages.

    Raises:
        UserError: empty dataset, unknown columns (the message lists the accepted formats with a
            conversion one-liner each), two formats' columns at once, or a row with the wrong
            types or nothing to train; names the row.
    """
    where = f"Dataset {source!r}" if source else "The dataset"
    if not rows:
        raise UserError(f"{where} has no examples. {_accepted_formats()}")
    first = rows[0]
    if not isinstance(first, dict):
        raise UserError(f"{where}, row 0: expected an object with named columns, got {type(first).__name__}.")
    matches = [fmt for fmt, columns in FORMAT_COLUMNS.items() if all(c in first for c in columns)]
    if len(matches) > 1 and "text" in matches:
        matches.remove("text")
    if len(matches) > 1:
        columns = " and ".join(f"`{'`/`'.join(FORMAT_COLUMNS[f])}` ({f})" for f in matches)
        raise UserError(f"{where} has the columns of two formats, {columns}: keep one so it is clear what is trained.")
    if not matches:
        raise UserError(f"{where} has columns {sorted(first)}, which match no accepted format. "
                        + _accepted_formats(list(first)))
    fmt = matches[0]
    for index, row in enumerate(rows):
        check_row(row, fmt, f"{where}, row {index}")
    return fmt  # type: ignore[return-value]


def _accepted_formats(columns: list[str] | None = None) -> str:
    """The accepted formats, and how to use data whose columns have other names: the column mapping
    the names make likely (`suggest_columns`), else the mapping's syntax."""
    lines = [f"  {fmt}: {FORMAT_SHAPES[fmt]}" for fmt in FORMATS]
    text = "Accepted formats (one object per row):\n" + "\n".join(lines)
    if columns is None:
        return text
    suggestion = suggest_columns(columns)
    if suggestion:
        yaml = ", ".join(f"{k}: {v}" for k, v in suggestion.items())
        overrides = " ".join(f"columns.{k}={v}" for k, v in suggestion.items())
        flags = " ".join(f"--column {k}={v}" for k, v in suggestion.items())
        return (f"{text}\nYour column names suggest a mapping: `columns: {{{yaml}}}` in a run config (the override "
                f"`{overrides}`; for `lowregret plan`, `{flags}`) reads them as that format; other columns are "
                "ignored.")
    return (f"{text}\nTo use columns with other names, map them: `columns: {{prompt: <your prompt column>, "
            "completion: <your answer column>}` in a run config (the override `columns.prompt=... "
            "columns.completion=...`; for `lowregret plan`, `--column prompt=...`); other columns are ignored.")


def _fail(at: str, problem: str, fmt: str) -> UserError:
    return UserError(f"{at}: {problem}. A row of format {fmt} looks like {FORMAT_SHAPES[fmt]}.")


def check_row(row, fmt: Format, at: str) -> None:
    """Raise a UserError, starting with `at` (which row), if `row` is not in format `fmt`."""
    if not isinstance(row, dict):
        raise UserError(f"{at}: expected an object with named columns, got {type(row).__name__}.")
    if fmt == "prompt_completion":
        for column in ("prompt", "completion"):
            if not isinstance(row.get(column), str):
                raise _fail(at, f"`{column}` must be a string, got {type(row.get(column)).__name__}", fmt)
        if not row["completion"]:
            raise UserError(f"{at}: the completion is empty, so there is nothing to learn: drop the row.")
    elif fmt == "text":
        if not isinstance(row.get("text"), str):
            raise _fail(at, f"`text` must be a string, got {type(row.get('text')).__name__}", fmt)
        if not row["text"].strip():
            raise UserError(f"{at}: the text is empty, so there is nothing to learn: drop the row.")
    elif fmt == "alpaca":
        for column, required in (("instruction", True), ("output", True), ("input", False), ("system", False)):
            value = row.get(column)
            if not (isinstance(value, str) or (value is None and not required)):
                raise _fail(at, f"`{column}` must be a string, got {type(value).__name__}", fmt)
        if not row["output"]:
            raise UserError(f"{at}: the output is empty, so there is nothing to learn: drop the row.")
        history = row.get("history") or []
        if not (isinstance(history, list) and all(
                isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
                for pair in history)):
            raise _fail(at, "`history` must be a list of [instruction, response] string pairs", fmt)
    elif fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise _fail(at, "`conversations` must be a non-empty list of {from, value} objects", fmt)
        for turn, message in enumerate(turns):
            if not (isinstance(message, dict) and isinstance(message.get("value"), str)
                    and message.get("from") in SHAREGPT_ROLES):
                raise UserError(
                    f'{at}, turn {turn}: expected {{"from": "human" | "gpt" | "system", "value": str}}, '
                    f"got {message!r:.80}."
                )
        if not isinstance(row.get("system", ""), str):
            raise _fail(at, f"`system` must be a string, got {type(row['system']).__name__}", fmt)
        if not any(m["from"] == "gpt" for m in turns):
            raise UserError(f'{at}: no "gpt" turn, so there is nothing to learn. Each conversation needs one.')
    else:
        _check_messages(row.get("messages"), at)
    turns = {"alpaca": "history", "sharegpt": "conversations", "chat": "messages"}.get(fmt)
    if turns and isinstance(row.get(turns), list) and len(row[turns]) > guard.limit("turns"):
        raise guard.over("turns", f"{at}: the conversation's `{turns}` count", len(row[turns]),
                         "split it into several rows (rendering one costs time that grows with turns squared).")


def _check_messages(messages, at: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise _fail(at, "`messages` must be a non-empty list of {role, content} objects", "chat")
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


def as_messages(row: dict, fmt: Format) -> list[dict]:
    """A conversation row (chat, alpaca, sharegpt) as chat messages [{role, content}, ...].

    Alpaca (LLaMA-Factory's reading): optional `system`, each `history` pair as a user/assistant
    turn, then `instruction` and a non-empty `input` joined by a newline as the user turn and
    `output` as the assistant turn. ShareGPT: an optional `system` column, then `human` → user,
    `gpt` → assistant, `system` → system.
    """
    if fmt == "chat":
        return row["messages"]
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    if fmt == "alpaca":
        for instruction, response in row.get("history") or []:
            messages += [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        query = "\n".join(part for part in (row["instruction"], row.get("input") or "") if part)
        return messages + [{"role": "user", "content": query}, {"role": "assistant", "content": row["output"]}]
    if fmt == "sharegpt":
        return messages + [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]]
    raise ValueError(f"{fmt} rows are not conversations")


def completion_texts(row: dict, fmt: Format) -> list[str]:
    """The trained text of a row: its assistant turns, its completion, or the whole text."""
    if fmt == "prompt_completion":
        return [row["completion"]]
    if fmt == "text":
        return [row["text"]]
    return [m["content"] for m in as_messages(row, fmt) if m["role"] == "assistant"]


# ---------------------------------------------------------------------------------------------
# Fingerprint (the held-out split is data/split.py)
# ---------------------------------------------------------------------------------------------


def dataset_fingerprint(rows: list[dict]) -> str:
    """First 16 hex chars of the sha256 of the rows' canonical JSON (sorted keys, compact).

    Values JSON cannot hold (dates from Parquet, ...) are written with `str`.
    """
    canonical = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
