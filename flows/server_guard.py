"""`python -m flows.server_guard PARENT_PID UVICORN_ARGS...`: uvicorn that ends with its parent.

Runs uvicorn in this process (the arguments are uvicorn's command line) and a watchdog thread that
asks it to shut down (SIGTERM, uvicorn's graceful stop) as soon as PARENT_PID is no longer this
process's parent, i.e. the parent died, even by kill -9; if the shutdown hangs, it exits anyway.
Kept free of Prefect and of the rest of `flows`: it starts in the server's own process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

POLL_S = 0.5  # how soon a dead parent is noticed
SHUTDOWN_GRACE_S = 10.0  # how long uvicorn may take to stop before the process exits regardless


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(SHUTDOWN_GRACE_S)
    os._exit(1)


def main(argv: list[str]) -> None:
    parent_pid, uvicorn_args = int(argv[0]), argv[1:]
    threading.Thread(target=_watch, args=(parent_pid,), daemon=True, name="parent-watchdog").start()
    from uvicorn.main import main as uvicorn_main

    uvicorn_main(uvicorn_args)


if __name__ == "__main__":
    main(sys.argv[1:])
