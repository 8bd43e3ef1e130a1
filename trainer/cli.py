"""`lowregret train`: one LoRA or FullFT run from a YAML preset plus key=value overrides.

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
    parser.add_argument("--config", help="YAML preset; omitted = the TrainConfig defaults")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a config option")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    parser.add_argument("--json", action="store_true", help="print the TrainResult as JSON at the end")
    parser.set_defaults(func=handle)


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
