"""Training-step speed and memory: plain transformers + peft against ours, in one run.

Each set-up builds a fresh random-init model of the chosen shape, warms up, then times
`--steps` optimizer steps with CUDA synchronisation and reports the median step time,
tokens/s, MFU against the bf16 matmul peak measured in the same run, and peak allocated memory.

    python benchmarks/step_speed.py                       # Llama-3.2-1B shape, 4 × 2048, r=16
    python benchmarks/step_speed.py --preset tiny --device cpu --steps 2   # a CPU smoke run

Set-ups:
    full-plain-mixed  transformers, fp32 weights + bf16 autocast, model(labels=...) loss
    full-plain-bf16   transformers, pure bf16 weights
    lora-plain        transformers + peft defaults (fp32 adapter on a bf16 base), model(labels=...)
    full-ours-bf16    pure bf16, the trainer's micro-batch step (trainer.loss.train_micro_batch:
                      chunked completion-token loss)
    lora-ours         peft adapter (fp32 master weights) on a bf16 base under bf16 autocast with
                      peft's input casting off, the trainer's micro-batch step
Add `--compile` to also run the `-ours` set-ups under torch.compile.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.dataset import IGNORE_INDEX  # noqa: E402
from trainer.data import Sequence, collate  # noqa: E402
from trainer.loss import loss_head, train_micro_batch  # noqa: E402

# Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json), used with random weights for speed.
PRESETS = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    ),
}
ALL_SETUPS = ("full-plain-mixed", "full-plain-bf16", "lora-plain", "full-ours-bf16", "lora-ours")


@dataclass
class Result:
    setup: str
    step_ms: float
    tokens_per_s: float
    mfu: float
    peak_gib: float
    loss_first: float
    loss_last: float
    trainable_params: int


def model_flops_per_token(cfg, seq_len: int, method: str, rank: int) -> float:
    """Training FLOPs per token from the planner's FLOP model (planner/flops.py), so the MFU printed
    here and the planner's run-time estimates use one model."""
    from planner.flops import estimate_flops
    from planner.lora import count_lora_params
    from planner.shapes import shape_from_config

    shape = shape_from_config(cfg.to_dict(), name="benchmark")
    flops = estimate_flops(shape, count_lora_params(shape, rank, targets="all"), seq_len)
    return flops.fullft_flops_per_token if method == "full" else flops.lora_flops_per_token


def measure_matmul_peak(device: str) -> float:
    if device != "cuda":
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - t0)


def build(setup: str, cfg, device: str, rank: int, compile_model: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    weight_dtype = torch.float32 if setup == "full-plain-mixed" or device == "cpu" else torch.bfloat16
    # Built on the device: a CPU random init of a 1B model, then the copy, costs seconds per set-up.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=weight_dtype, attn_implementation="sdpa")
    if setup.startswith("lora"):
        lora = LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, lora)
        if setup.startswith("lora-ours"):
            for module in model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    if compile_model:
        core.model = torch.compile(core.model)
    return model, core, opt, sum(p.numel() for p in params)


def step_fn(setup: str, model, core, opt, batch, device: str):
    ids, labels, ours = batch
    autocast = setup in ("full-plain-mixed",) or setup.startswith("lora-ours")
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast and device == "cuda"):
        if "plain" in setup:
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
        else:
            count = ours.loss_positions_N.numel()
            loss = train_micro_batch(model, ours, 1.0 / count, head=loss_head(core)[0]).nll_sum / count
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def run_setup(setup, cfg, args, peak_flops) -> Result:
    device = args.device
    compile_model = setup.endswith("+compile")
    base_setup = setup.removesuffix("+compile")
    model, core, opt, n_trainable = build(base_setup, cfg, device, args.rank, compile_model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    # Every token is a completion token: the trainer's batch of the same sequences, for the -ours set-ups.
    ours = collate([Sequence(row, row[1:] + [IGNORE_INDEX], list(range(len(row)))) for row in ids.tolist()], 0, packed=False)
    batch = (ids, ids.clone(), ours.to(device))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = step_fn(base_setup, model, core, opt, batch, device)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= args.warmup:
            times.append(dt)
    if args.profile and setup in args.profile.split(","):
        profile_steps(setup, base_setup, model, core, opt, batch, device, args.profile_rows)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    step_s = statistics.median(times)
    tokens = args.batch * args.seq_len
    method = "lora" if base_setup.startswith("lora") else "full"
    flops = model_flops_per_token(cfg, args.seq_len, method, args.rank) * tokens
    del model, core, opt
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return Result(setup, step_s * 1e3, tokens / step_s, flops / step_s / peak_flops, peak, losses[0], losses[-1], n_trainable)


def profile_steps(setup, base_setup, model, core, opt, batch, device, rows):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step_fn(base_setup, model, core, opt, batch, device)
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"\n== profile {setup} (2 steps) ==")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def markdown(results, args, device_name, peak_flops) -> str:
    by = {r.setup: r for r in results}
    lines = [
        f"device: {device_name}; shape: {args.preset}; batch {args.batch} × {args.seq_len}; rank {args.rank}; "
        f"measured bf16 matmul peak {peak_flops / 1e12:.0f} TFLOP/s",
        "",
        "| set-up | step ms | tokens/s | MFU | peak GiB | vs lora-plain tokens/s | vs same-kind full step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = by.get("lora-plain")
        vs_plain = f"{r.tokens_per_s / base.tokens_per_s:.2f}×" if base and r.setup.startswith("lora") else ""
        full_key = ("full-ours-bf16" if "ours" in r.setup else "full-plain-bf16") + (
            "+compile" if r.setup.endswith("+compile") else ""
        )
        full = by.get(full_key)
        vs_full = f"{r.step_ms / full.step_ms:.2f}" if full and r.setup.startswith("lora") else ""
        lines.append(
            f"| {r.setup} | {r.step_ms:.1f} | {r.tokens_per_s / 1e3:.1f}k | {r.mfu:.1%} | {r.peak_gib:.1f} | {vs_plain} | {vs_full} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options; `argv` None reads the command line (benchmarks/gpu_check.py passes a list)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--setups", default=",".join(ALL_SETUPS))
    ap.add_argument("--compile", action="store_true", help="also run each -ours set-up under torch.compile")
    ap.add_argument("--profile", default="", help="comma list of set-ups to profile (top kernels)")
    ap.add_argument("--profile-rows", type=int, default=18)
    ap.add_argument("--out", default="benchmarks/results/step_speed")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Time every set-up of `args` in this process; returns the JSON payload (device, peak, results)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**PRESETS[args.preset])
    setups = [s for s in args.setups.split(",") if s]
    if args.compile:
        setups += [s + "+compile" for s in setups if "ours" in s]
    peak_flops = measure_matmul_peak(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = []
    for setup in setups:
        r = run_setup(setup, cfg, args, peak_flops)
        print(json.dumps(asdict(r)), flush=True)
        results.append(r)
    return {"device": device_name, "date": time.strftime("%Y-%m-%d"), "args": vars(args), "peak_flops": peak_flops,
            "results": [asdict(r) for r in results]}


def main() -> None:
    args = parse_args()
    payload = run(args)
    results = [Result(**r) for r in payload["results"]]
    table = markdown(results, args, payload["device"], payload["peak_flops"])
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
