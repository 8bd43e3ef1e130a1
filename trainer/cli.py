"""`lowregret train` (one LoRA or FullFT run) and `lowregret rl-train` (one RL run), each from a YAML
preset plus key=value overrides.

Nothing heavy is imported here at module level, so `lowregret --help` stays fast.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a LoRA adapter or a full fine-tune",
        description=(
            "Train LoRA or FullFT from a YAML preset (configs/<model>/<method>.yaml) with key=value "
            "overrides, e.g. `lowregret train --config configs/smollm2/lora.yaml rank=8 max_steps=50`. "
            "Writes adapter/ or model/, curves.json and summary.json to output_dir. Runs unchanged "
            "under `accelerate launch -m flows.cli train ...`."
        ),
    )
    _run_args(parser, "TrainConfig", "TrainResult")
    parser.set_defaults(func=handle)

    rl = subparsers.add_parser(
        "rl-train",
        help="RL with a verifiable reward (GRPO-style policy gradient), LoRA rank 1 or FullFT",
        description=(
            "Policy-gradient RL on prompts with answers: each step samples group_size completions per prompt, "
            "scores them with the reward (exact, regex:<pattern>, or python:<module>:<function>, which runs your "
            "code) and follows reward minus the group mean. Options are RLConfig fields "
            "(configs/rl/*.yaml, docs/RL.md), e.g. `lowregret rl-train method=full lr=3e-5`. Writes adapter/ or "
            "model/, curves.json, eval_rewards.json and summary.json to output_dir."
        ),
    )
    _run_args(rl, "RLConfig", "RLResult")
    rl.set_defaults(func=handle_rl)


def _run_args(parser: argparse.ArgumentParser, config: str, result: str) -> None:
    parser.add_argument("--config", help=f"YAML preset (configs/); omitted = the {config} defaults")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a config option")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    parser.add_argument("--json", action="store_true", help=f"print the {result} as JSON at the end")


def handle_rl(args: argparse.Namespace) -> int:
    from trainer.rl import train_rl
    from trainer.rl_config import load_rl_config

    result = train_rl(load_rl_config(args.config, args.overrides), progress=not args.no_progress)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    return 0


def handle(args: argparse.Namespace) -> int:
    from planner.dataset import check_local_file
    from planner.paths import check_output_dir
    from trainer.config import load_config

    config = load_config(args.config, args.overrides)
    # Before torch is imported: a bad output path or data file fails at once.
    check_output_dir(config.output_dir, "output_dir")
    for source in filter(None, (config.dataset, config.eval_dataset)):
        check_local_file(source)
    from trainer.loop import train

    result = train(config, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    return 0
