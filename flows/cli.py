"""The `lowregret` command: one sub-command per step, each owned by its package.

Each package's `cli.py` exposes `register(subparsers)`, which adds its sub-commands with
`set_defaults(func=handler)`; a handler takes the parsed args and returns an exit code. The
`cli.py` modules import nothing heavy at module level, so `lowregret plan` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from planner.errors import UserError

# Packages whose cli.register adds sub-commands, in help order.
_CLI_MODULES = ("planner.cli", "trainer.cli", "evaluation.cli", "flows.commands", "serving.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowregret",
        description="Plan, train, evaluate and register LoRA adapters that match full fine-tuning.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _CLI_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _terminate(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C (`finally` blocks run); inside a flow run Prefect's own handler
    takes over and marks the run Crashed first."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"lowregret {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowregret {args.command}: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:
        signum = getattr(exc, "signal", None)  # prefect.exceptions.TerminationSignal (SIGTERM in a flow)
        if not isinstance(signum, int):
            raise
        print(f"lowregret {args.command}: stopped by signal {signum}", file=sys.stderr)
        return 128 + signum
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
