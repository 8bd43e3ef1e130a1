"""One rank of a launched run: `python -m trainer.worker CONFIG.json`, started by torchrun
(`trainer.launch`). Trains the run config in the file (`trainer.launch.write_config`): a TrainConfig with
`trainer.loop.train`, an RLConfig with `trainer.rl.train_rl`; a user error is
printed in one paragraph and the rank exits 2; any error is also written to
$LOWREGRET_ERROR_DIR/rank-<RANK>.json, so the launcher reports the failing rank's own message.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from data.errors import UserError
from trainer.launch import ERROR_DIR_ENV


def _record(kind: str, message: str) -> None:
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder:
        rank = int(os.environ.get("RANK", "0"))
        (Path(folder) / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "kind": kind, "message": message}))


def main(argv: list[str]) -> int:
    from trainer.launch import read_config, train_here

    try:
        train_here(read_config(Path(argv[0])), progress=False)
    except UserError as exc:
        _record("user", str(exc))
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except BaseException as exc:
        _record("crash", "".join(traceback.format_exception_only(exc)).strip())
        raise
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter exits: a gloo group left alive can abort
    the rank at exit ("terminate called without an active exception", SIGABRT), after its run finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
