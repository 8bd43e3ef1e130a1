"""Output paths checked before any work: a folder or file we will write must be creatable.

Every command that writes (plan --out, train output_dir, export DIR, compare --chart, the flows'
--workdir) calls these first, so a path under a regular file or in a read-only folder is a
`UserError` naming the path, not a traceback after minutes of work. Nothing is left behind here (the
writability probe is an unnamed temporary file).
"""

from __future__ import annotations

import os
from pathlib import Path

from data.errors import UserError


def check_output_dir(path: str | os.PathLike, option: str) -> None:
    """Refuse a folder that exists as a file, or that cannot be created or written.

    Args:
        path: the folder the command will create or write into.
        option: how the user named it (`--out`, `output_dir`, ...), for the message.
    """
    folder = Path(path).expanduser()
    if folder.is_symlink():  # replaced or renamed onto at the end of the work: refused before it
        target = os.readlink(folder)
        state = "a dangling symbolic link" if not folder.exists() else "a symbolic link"
        raise UserError(f"{option} {str(path)!r} is {state} (to {target!r}): the folder is replaced or renamed "
                        f"onto when the work ends, which a link would turn into a failure then. Pass a real folder "
                        f"path (e.g. {target!r} itself).")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {str(path)!r} is a file, not a folder: pass a folder path.")
    _check_creatable(folder, path, option)


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """Refuse a file path that is a folder, or whose folder cannot be created or written."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise UserError(f"{option} {str(path)!r} is a folder: pass a file path, e.g. {Path(path) / 'out.png'}.")
    if file.exists() and not os.access(file, os.W_OK):
        raise UserError(f"{option} {str(path)!r} exists and is read-only: pass another file path.")
    _check_creatable(file.parent, path, option)


def check_existing_dir(path: str | os.PathLike, option: str) -> Path:
    """A folder that must exist already (e.g. --workdir): a mistyped path is refused, not created."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise UserError(
            f"{option} {str(path)!r} {what}: pass an existing folder (create it first with mkdir if you "
            "meant a new one)."
        )
    _check_creatable(folder, path, option)
    return folder.resolve()


def _check_creatable(folder: Path, given: str | os.PathLike, option: str) -> None:
    """The nearest existing ancestor of `folder` (itself included) must be a writable folder."""
    ancestor = folder.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(
            f"{option} {str(given)!r} cannot be created: {ancestor} is a file, not a folder. "
            "Choose a path outside it."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(
            f"{option} {str(given)!r} cannot be written: {ancestor} is read-only for this user. "
            "Choose a folder you can write to."
        )
    # os.access says yes to root everywhere, but /proc, /sys or a read-only mount still refuse (EPERM,
    # ENOENT, EROFS) when the work ends: probe with an unnamed temporary file, gone when closed.
    import tempfile

    try:
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as exc:
        raise UserError(
            f"{option} {str(given)!r} cannot be written: creating a file in {ancestor} fails "
            f"({exc.strerror or exc}). Choose a folder you can write to."
        ) from None
