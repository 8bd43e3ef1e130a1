"""Tokenize a dataset once and reuse it: an on-disk Arrow cache of token ids and loss labels.

A pipeline reads its data in `check_inputs`, in the plan's profile and in each of its two
trainings; each used to parse and tokenize it again. Here the rows are tokenized once per
(data fingerprint, tokenizer) and written as an Arrow stream file, the format of `datasets`'
own cache files, which `datasets.Dataset.from_file` memory-maps back in well under a second.

- Key: sha256 of the data fingerprint (`dataset_fingerprint` of the rows read), the tokenizer's
  fingerprint (its whole `tokenizer.json`, chat template and special tokens) and
  `TOKENIZATION_VERSION`. The examples are stored untruncated: `max_length` is a slice of the
  token ids (`truncate_example`), so one entry serves every max_length, the profile's untruncated
  counts as well as each training's cut.
- A source is not even parsed again while it is unchanged: its identity (a local
  file's absolute path, size and modification time, or the built-in's name, options, Python
  version and generator source; a `save_to_disk` folder's files' names, sizes and times; a Hub id's
  split fingerprint from the `datasets` cache) maps to its fingerprint in a small JSON file.
- Where: `$LOWREGRET_TOKEN_CACHE`, else `$LOWREGRET_CACHE/tokens`, else
  `~/.cache/lowregret/tokens`. Entries are written to a temporary folder and renamed, so a
  killed run or two processes tokenizing at once never leave a half-written entry. Delete the
  folder to reclaim the space; nothing else refers to it.

Nothing here is executed from disk: the cache holds Arrow columns and JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from data import builtin_datasets
from data.dataset import (
    IGNORE_INDEX,
    TokenizedExample,
    dataset_fingerprint,
    detect_format,
    ignored_columns,
    load_rows,
)
from data.render import Renderer, check_max_length, prompt_too_long, truncate_example

# Bump when Renderer.examples changes what it produces for the same rows and tokenizer.
TOKENIZATION_VERSION = 1
_STALE_S = 3600  # a temporary of a build older than this is a dead build's (a live one renames sooner)
_CHUNK_ROWS = 1000  # rows per batched tokenizer call and per Arrow record batch
_DATA_FILE = "data.arrow"
_META_FILE = "meta.json"


def cache_root() -> Path:
    """$LOWREGRET_TOKEN_CACHE, else $LOWREGRET_CACHE/tokens, else ~/.cache/lowregret/tokens."""
    if os.environ.get("LOWREGRET_TOKEN_CACHE"):
        return Path(os.environ["LOWREGRET_TOKEN_CACHE"])
    root = os.environ.get("LOWREGRET_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lowregret") / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex chars that change whenever the tokenizer would tokenize or render differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, vocab, str(getattr(tokenizer, "chat_template", None)),
             repr(tokenizer.eos_token_id), repr(sorted(tokenizer.all_special_tokens))]
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class TokenizedDataset:
    """Every row of a dataset tokenized (untruncated), memory-mapped from the cache.

    Attributes:
        source: the dataset reference as given.
        format: the detected format (`data.dataset.FORMATS`).
        fingerprint: `dataset_fingerprint` of the rows read.
        rows: number of rows.
        path: the cache entry's folder.
        table: a `datasets.Dataset` with columns input_ids, labels (IGNORE_INDEX where not
            trained), n_tokens, completion_tokens (trained tokens), prompt_tokens (tokens before
            the first trained one) and completion_text (the trained text, for compressors).
        ignored_columns: the first row's columns the format does not read (`ignored_columns`).
    """

    source: str
    format: str
    fingerprint: str
    rows: int
    path: Path
    table: object
    ignored_columns: tuple[str, ...] = ()

    def column(self, name: str, indices: list[int] | None = None) -> list:
        """One column as a Python list, for all rows or the given row indices.

        Read from the memory-mapped Arrow table directly (`take` + `to_pylist`): ~5x faster than
        going through `datasets`' row formatting.
        """
        column = self.table.data.table.column(name)
        return (column if indices is None else column.take(indices)).to_pylist()

    def check_max_length(self, max_length: int, indices: list[int] | None = None) -> None:
        """Raise, naming the first such row, if a prompt alone fills `max_length`."""
        check_max_length(max_length)
        prompts = self.column("prompt_tokens", indices)
        for position, tokens in enumerate(prompts):
            if tokens >= max_length:
                raise prompt_too_long(tokens, max_length, position if indices is None else indices[position])

    def examples(self, indices: list[int], max_length: int) -> list[TokenizedExample]:
        """The rows at `indices`, each cut to `max_length` tokens (`truncate_example`).

        Raises:
            UserError: a prompt that alone fills max_length (names the row).
        """
        check_max_length(max_length)
        columns = [self.column(name, indices) for name in ("input_ids", "labels", "prompt_tokens")]
        return [
            truncate_example(TokenizedExample(ids, labels, False), max_length, row_index=i, prompt_tokens=prompt)
            for i, ids, labels, prompt in zip(indices, *columns, strict=True)
        ]


def tokenized_dataset(source: str, tokenizer, *, limit: int | None = None,
                      columns: dict | None = None) -> TokenizedDataset:
    """The tokenized rows of `source` (first `limit` rows, `columns` renamed: `load_rows`), from the
    cache or tokenized now.

    Raises:
        UserError: any error of `load_rows`, `detect_format` or tokenization, before anything is
            written to the cache.
    """
    tok_key = tokenizer_fingerprint(tokenizer)
    identity = _identity(source, limit, columns)
    known = _read_json(_memo_path(identity)) if identity else None
    if known is not None:
        cached = _open(source, _entry_key(known["fingerprint"], tok_key))
        if cached is not None:
            return cached
    rows = load_rows(source, limit=limit, columns=columns)
    fmt = detect_format(rows, source=source)
    fingerprint = dataset_fingerprint(rows)
    key = _entry_key(fingerprint, tok_key)
    cached = _open(source, key)
    if cached is None:
        _build(key, rows, fmt, tokenizer, {"source": source, "format": fmt, "fingerprint": fingerprint,
                                           "rows": len(rows), "tokenizer": tok_key,
                                           "ignored_columns": ignored_columns(rows[0], fmt),
                                           "version": TOKENIZATION_VERSION})
        cached = _open(source, key)
    if identity:
        _write_json(_memo_path(identity), {"fingerprint": fingerprint, "identity": identity})
    return cached


def find_cached(source: str, tokenizer, *, limit: int | None = None,
                columns: dict | None = None) -> TokenizedDataset | None:
    """The cached tokenization of a local file or built-in seen before unchanged, else None.

    Reads neither the data nor anything else when there is none: for callers that can do with
    less than every row tokenized (the plan's sampled profile).
    """
    identity = _identity(source, limit, columns)
    known = _read_json(_memo_path(identity)) if identity else None
    if known is None:
        return None
    return _open(source, _entry_key(known["fingerprint"], tokenizer_fingerprint(tokenizer)))


# ------------------------------------------------------------------------------------- internals


def _identity(source: str, limit: int | None, columns: dict | None = None) -> str | None:
    """What makes an unchanged source's rows the same without reading them, or None (always read).
    A column mapping is part of it: other names, other rows."""
    mapping = sorted((columns or {}).items())
    if builtin_datasets.is_builtin(source):
        code = hashlib.sha256(Path(builtin_datasets.__file__).read_bytes()).hexdigest()[:16]
        return json.dumps(["builtin", source, limit, sys.version, code] + ([mapping] if mapping else []))
    path = Path(source)
    tail = [limit] + ([mapping] if mapping else [])
    if path.is_file():
        stat = path.stat()
        return json.dumps(["file", str(path.resolve()), stat.st_size, stat.st_mtime_ns] + tail)
    if path.is_dir():  # a save_to_disk folder: its files' names, sizes and modification times
        files = _folder_files(path)
        return None if files is None else json.dumps(["folder", str(path.resolve()), files] + tail)
    from data.dataset import hub_fingerprint

    fingerprint = hub_fingerprint(source)  # a Hub id: the fingerprint `datasets` gives its cached split
    return None if fingerprint is None else json.dumps(["hub", source, fingerprint] + tail)


_MAX_FOLDER_FILES = 10_000


def _folder_files(folder: Path) -> list | None:
    """[relative path, size, mtime_ns] of every file under `folder`, sorted; None past _MAX_FOLDER_FILES
    (then the folder is read and fingerprinted each time, as before)."""
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            files.append([path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
            if len(files) > _MAX_FOLDER_FILES:
                return None
    return files


def _memo_path(identity: str) -> Path:
    return cache_root() / "sources" / f"{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"


def _entry_key(fingerprint: str, tok_key: str) -> str:
    payload = f"{fingerprint}|{tok_key}|{TOKENIZATION_VERSION}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, record: dict) -> None:
    from data.atomic import write_json

    write_json(path, record)


def _open(source: str, key: str) -> TokenizedDataset | None:
    folder = cache_root() / key
    meta = _read_json(folder / _META_FILE)
    if meta is None or not (folder / _DATA_FILE).is_file():
        return None
    import datasets

    table = datasets.Dataset.from_file(str(folder / _DATA_FILE), in_memory=False)
    return TokenizedDataset(source, meta["format"], meta["fingerprint"], meta["rows"], folder, table,
                            tuple(meta.get("ignored_columns", ())))


def _build(key: str, rows: list[dict], fmt: str, tokenizer, meta: dict) -> None:
    """Tokenize every row and write the entry (temporary folder renamed into place)."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    from data.dataset import completion_texts

    renderer = Renderer(tokenizer)
    ids = pa.list_(pa.int32())
    schema = pa.schema([("input_ids", ids), ("labels", ids), ("n_tokens", pa.int32()),
                        ("completion_tokens", pa.int32()), ("prompt_tokens", pa.int32()),
                        ("completion_text", pa.large_string())])
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{key}.*"):  # a build killed mid-way (an abort, kill -9) left its temporary
        try:
            touched = max([stale.stat().st_mtime, *(f.stat().st_mtime for f in stale.iterdir())])
        except OSError:  # removed meanwhile by another process
            continue
        if time.time() - touched > _STALE_S:  # a live build writes its files continually
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        with pa.OSFile(str(tmp / _DATA_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            bar = tqdm(total=len(rows), desc=f"tokenizing {meta['source']}", unit="rows", leave=False,
                       disable=len(rows) < 10 * _CHUNK_ROWS)
            for start in range(0, len(rows), _CHUNK_ROWS):
                chunk = rows[start:start + _CHUNK_ROWS]
                indices = list(range(start, start + len(chunk)))
                examples = renderer.examples(chunk, fmt, row_indices=indices)
                trained = [[label != IGNORE_INDEX for label in e.labels] for e in examples]
                writer.write_batch(pa.record_batch({
                    "input_ids": [e.input_ids for e in examples],
                    "labels": [e.labels for e in examples],
                    "n_tokens": [len(e.input_ids) for e in examples],
                    "completion_tokens": [sum(mask) for mask in trained],
                    "prompt_tokens": [mask.index(True) for mask in trained],
                    "completion_text": ["\n".join(completion_texts(row, fmt)) for row in chunk],
                }, schema=schema))
                bar.update(len(chunk))
            bar.close()
        (tmp / _META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        try:
            os.replace(tmp, root / key)
        except OSError:
            if _read_json(root / key / _META_FILE) is None:  # not merely beaten by another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
