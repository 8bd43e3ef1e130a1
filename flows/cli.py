"""The `lowregret` command: one sub-command per step, each owned by its package.

Each package's `cli.py` exposes `register(subparsers)`, which adds its sub-commands with
`set_defaults(func=handler)`; a handler takes the parsed args and returns an exit code. The
`cli.py` modules import nothing heavy at module level, so `lowregret plan` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from planner.errors import UserError

# Packages whose cli.register adds sub-commands, in help order.
# `train` is registered by flows.commands: it wires the trainer to MLflow (report_to=mlflow), which
# trainer/ itself never imports.
_CLI_MODULES = ("planner.cli", "evaluation.cli", "flows.commands", "serving.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowregret",
        description="Plan, train, evaluate and register LoRA adapters that match full fine-tuning.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _CLI_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"lowregret {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowregret {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
