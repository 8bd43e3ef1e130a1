"""Atomic writes: a file or folder appears complete or not at all, and two writers never share a
temporary name. The one helper for it; every writer of a file someone else may read (a report, a
chart, a calibration record, a cache entry, a pipeline summary, an exported model) uses it.

The temporary sibling is made by `tempfile` in the target's own folder (unique per call, so two
processes or threads writing the same target do not clobber each other's half-written file, and
the final `os.replace` is a rename within one file system), then renamed over the target. On any
error the temporary is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path` (same suffix, so writers that pick a format by it
    work), and rename it over `path` when the block ends without error. `mode`: the file's
    permissions (mkstemp's are private; what we write is meant to be read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, mode: int = 0o644) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with replacing(path, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, record, *, indent: int | None = None, default=None) -> Path:
    """Write `record` as JSON to `path` atomically (a trailing newline when indented)."""
    text = json.dumps(record, indent=indent, default=default)
    return write_text(path, text + "\n" if indent is not None else text)


@contextlib.contextmanager
def replacing_dir(path: str | Path, mode: int = 0o755) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; when the block ends without error it is renamed to
    `path` (which must not exist, or be an empty folder). On error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(mode)  # mkdtemp's folder is private
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
