"""Locks between processes, released by the kernel when their holder dies (even by kill -9).

`ProcessLockManager` implements Prefect's `LockManager` protocol with OS file locks (`flock`): it is
the lock manager of the cached FullFT baseline's transaction (isolation level SERIALIZABLE), so a
second pipeline on the same baseline waits for the first and then reads its cached result instead
of training it again. Prefect's own `FileSystemLockManager` writes lock files that outlive a killed
holder unless a hold timeout is given, and a baseline has no sensible one (minutes to days);
`flock` ends with the process, so a crash never leaves a stale lock.

The same locks serialise, on one machine:
- the first creation of an MLflow SQLite store (`hold_file` on the database): MLflow migrates a
  fresh database's schema on first use, and two processes doing it at once fail ("duplicate column
  name");
- identical LoRA runs (`run_lock`): they write the same run folder;
- a registered model's read-modify-write (`registry_lock`): find-or-register by fingerprint, and
  the champion alias with its history tag. With a tracking server (several machines) the registry
  lock is a Prefect global concurrency limit of 1 on the Prefect server the writers share.

POSIX only (`fcntl`), like the rest of the local tooling. Lock files stay on disk (deleting a lock
file another process holds open would split the lock in two); they are empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

POLL_S = 0.1  # how often a waiting process retries a held lock
REGISTRY_LOCK_TIMEOUT_S = 600.0  # registry writes take seconds; 10 minutes means a hung holder


class ProcessLockManager:
    """Prefect `LockManager` on `flock`: one lock file per key under `directory`.

    Without a directory, the locks sit beside the records they guard: `locks/` next to Prefect's
    local result storage of the moment (`.lowregret/prefect/locks` under the CLI), so one lock
    manager serves every working directory. Within a process a second holder of a key waits too (a
    per-key thread lock), so two flows in threads of one process are serialised like two processes.
    `hold_timeout` is not needed: the kernel releases a dead holder's lock.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        self._guard = threading.Lock()
        self._threads: dict[str, threading.Lock] = {}
        self._held: dict[str, tuple[str, int]] = {}  # key -> (holder, file descriptor)

    def __getstate__(self) -> dict:  # task runners pickle tasks with their cache policy
        return {"directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProcessLockManager) and other.directory == self.directory

    def __hash__(self) -> int:
        return hash(self.directory)

    def path(self, key: str) -> Path:
        if self.directory is not None:
            directory = self.directory
        else:
            from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

            directory = Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()).parent / "locks"
        readable = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:80]
        return directory / f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.lock"

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        with self._guard:
            if self._held.get(key, (None,))[0] == holder:
                return True
            thread_lock = self._threads.setdefault(key, threading.Lock())
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        if not thread_lock.acquire(timeout=-1 if deadline is None else max(0.0, acquire_timeout)):
            return False
        fd = _flock(self.path(key), deadline)
        if fd is None:
            thread_lock.release()
            return False
        with self._guard:
            self._held[key] = (holder, fd)
        return True

    def release_lock(self, key: str, holder: str) -> None:
        with self._guard:
            held = self._held.get(key)
            if held is None or held[0] != holder:
                raise ValueError(f"{holder!r} does not hold the lock on {key!r}")
            del self._held[key]
            fcntl.flock(held[1], fcntl.LOCK_UN)
            os.close(held[1])
            self._threads[key].release()

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        fd = _flock(self.path(key), deadline=time.monotonic())
        if fd is None:
            return True
        _unlock(fd)
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self._held.get(key, (None,))[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while key in self._held:  # held in this process: wait for its release
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
        fd = _flock(self.path(key), deadline)
        if fd is None:
            return False
        _unlock(fd)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.wait_for_lock, key, timeout)

    @contextlib.contextmanager
    def hold(self, key: str, timeout: float | None = None) -> Iterator[None]:
        """Hold `key` for the block (TimeoutError if not acquired within `timeout` seconds)."""
        holder = f"{os.getpid()}:{threading.get_ident()}:{time.monotonic_ns()}"
        if not self.acquire_lock(key, holder, acquire_timeout=timeout):
            raise TimeoutError(f"lock {key!r} ({self.path(key)}) still held after {timeout} s")
        try:
            yield
        finally:
            self.release_lock(key, holder)


def _flock(path: Path, deadline: float | None) -> int | None:
    """An open descriptor of `path` holding its exclusive flock, or None at the deadline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(POLL_S)


def _unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def lock_manager(settings) -> ProcessLockManager:
    """The lock manager of a working directory's `.lowregret/locks`."""
    return ProcessLockManager(settings.home / "locks")


@contextlib.contextmanager
def hold_file(path: str | os.PathLike) -> Iterator[None]:
    """Hold the flock of `path` itself (created empty if missing; its content is never touched).

    Used on a SQLite database file while its schema is created: the lock leaves no file of its own,
    and SQLite's own locks (fcntl byte ranges) are independent of flock.
    """
    fd = _flock(Path(path), deadline=None)
    try:
        yield
    finally:
        _unlock(fd)


def run_lock(settings, run_key: str) -> contextlib.AbstractContextManager:
    """Held by a pipeline from training a run (by its key) until the run's registration is done."""
    return lock_manager(settings).hold(f"run-{run_key}")


@contextlib.contextmanager
def registry_lock(settings, name: str, timeout_s: float = REGISTRY_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Serialise read-modify-write of registered model `name` (its versions, aliases and tags).

    A local registry (SQLite, files) can only be shared by processes on this machine: a file lock
    beside it is enough. A registry on a tracking server is written from several machines: the lock
    is the Prefect global concurrency limit `lowregret-registry-<name>` (1 slot, leased, so a dead
    holder's slot returns after the lease) on the Prefect server at PREFECT_API_URL. Without one,
    the file lock under ~/.cache/lowregret/locks holds for the processes of this machine only.
    """
    if _is_local(settings.registry_uri):
        with lock_manager(settings).hold(f"registry-{name}", timeout=timeout_s):
            yield
    elif settings.prefect_api_url:
        with _global_limit(f"lowregret-registry-{name}", timeout_s):
            yield
    else:
        uri = hashlib.sha256(settings.registry_uri.encode()).hexdigest()[:12]
        root = Path(os.environ.get("LOWREGRET_CACHE") or Path.home() / ".cache" / "lowregret") / "locks"
        with ProcessLockManager(root).hold(f"registry-{uri}-{name}", timeout=timeout_s):
            yield


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


@contextlib.contextmanager
def _global_limit(name: str, timeout_s: float) -> Iterator[None]:
    """One slot of Prefect global concurrency limit `name`, created with limit 1 if missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another writer created it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield
