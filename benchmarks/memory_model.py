"""The planner's memory model against the trainer's measured step, on a grid of training set-ups.

Measured: `trainer.memory.measure_peak_memory`, the trainer's own step (precision policy, peft,
accelerate autocast, chunked loss, fused AdamW) on fake tensors under PyTorch's MemTracker, at 2-3
layers extrapolated to the model's depth. Planner: `planner.memory.estimate_memory(...)
.allocated_bytes`, one GPU. Both are allocated bytes: no CUDA context, kernel workspaces or
allocator fragmentation.

    python benchmarks/memory_model.py                  # the grid; writes benchmarks/MEMORY_RESULTS.md
    python benchmarks/memory_model.py --only 1,7,13    # some rows (1-based), no file written
    python benchmarks/memory_model.py --fit            # re-measure planner/memory.py's MEASURED constants
    python benchmarks/memory_model.py --sharded        # one FSDP2 rank of 2, 4, 8 (fake process group);
                                                       # rewrites the FSDP2 section of MEMORY_RESULTS.md

A GPU check imports `GRID`, `measure` (device="cuda" puts the fakes on the GPU's device type),
`estimate` and `compare` from here and adds torch.cuda.max_memory_allocated beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner import memory as memory_mod  # noqa: E402
from planner.lora import count_lora_params  # noqa: E402
from planner.shapes import load_config, load_shape, shape_from_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "MEMORY_RESULTS.md"
RATIO_BAND = (0.90, 1.10)


@dataclass(frozen=True)
class Setup:
    """One training set-up: a catalog model, a method and the micro-batch the trainer runs."""

    model: str
    method: str
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool = False
    grad_accum_steps: int = 1
    rank: int = 16
    world_size: int = 1

    @property
    def name(self) -> str:
        return (f"{self.model} {self.method} {self.micro_batch}x{self.seq_len}"
                + (" ckpt" if self.gradient_checkpointing else "")
                + (f" accum{self.grad_accum_steps}" if self.grad_accum_steps > 1 else "")
                + (f" r{self.rank}" if self.method == "lora" else "")
                + (f" fsdp{self.world_size}" if self.world_size > 1 else ""))


# Llama and Qwen3 dense shapes from 1B to 8B, a Qwen3-MoE shape; full (mixed precision), full_bf16
# and lora; with and without gradient checkpointing and accumulation; micro-batch 1-8, 512-4096 tokens.
GRID: tuple[Setup, ...] = (
    Setup("Llama-3.2-1B", "full", 4, 2048),
    Setup("Llama-3.2-1B", "full_bf16", 8, 1024, gradient_checkpointing=True),
    Setup("Llama-3.2-1B", "lora", 8, 4096),
    Setup("Llama-3.2-3B", "lora", 2, 2048, gradient_checkpointing=True),
    Setup("Llama-3.2-3B", "full", 1, 4096, gradient_checkpointing=True, grad_accum_steps=8),
    Setup("Llama-3.1-8B", "lora", 1, 2048),
    Setup("Llama-3.1-8B", "lora", 4, 2048, grad_accum_steps=8),
    Setup("Llama-3.1-8B", "full", 1, 512),
    Setup("Llama-3.1-8B", "full_bf16", 2, 4096, gradient_checkpointing=True),
    Setup("Qwen3-8B", "lora", 8, 512),
    Setup("Qwen3-8B", "full_bf16", 4, 1024, grad_accum_steps=4),
    Setup("Qwen3-8B", "lora", 2, 4096, gradient_checkpointing=True),
    Setup("Qwen3-30B-A3B", "lora", 1, 2048),
    Setup("Qwen3-30B-A3B", "lora", 4, 1024, gradient_checkpointing=True),
    Setup("Qwen3-30B-A3B", "full_bf16", 2, 512),
)


# One FSDP2 rank (trainer/distributed.py's sharding) of 2, 4 and 8: the FullFT baseline and LoRA of
# the flagship 8B, and the MoE model, LoRA and bf16 FullFT (fp32 MoE weights cannot run on the CPU fakes).
SHARDED_GRID: tuple[Setup, ...] = tuple(
    Setup(model, method, micro_batch, seq_len, world_size=world)
    for model, method, micro_batch, seq_len in (("Llama-3.1-8B", "full", 1, 2048), ("Llama-3.1-8B", "lora", 1, 2048),
                                                ("Qwen3-30B-A3B", "lora", 1, 2048),
                                                ("Qwen3-30B-A3B", "full_bf16", 1, 512))
    for world in (2, 4, 8)
)
SHARDED_SECTION = "## FSDP2: one rank of a sharded run"


def measure(setup: Setup, device: str = "cpu"):
    """The trainer's step, measured (a `trainer.memory.StepMemory`)."""
    from trainer.memory import measure_peak_memory

    return measure_peak_memory(load_config(setup.model), setup.method, seq_len=setup.seq_len,
                               micro_batch=setup.micro_batch, grad_accum_steps=setup.grad_accum_steps,
                               gradient_checkpointing=setup.gradient_checkpointing, rank=setup.rank, device=device,
                               world_size=setup.world_size)


def estimate(setup: Setup) -> memory_mod.MemoryEstimate:
    """The planner's estimate for one GPU of `setup.world_size`."""
    shape = load_shape(setup.model)
    adapter = count_lora_params(shape, setup.rank).total
    return memory_mod.estimate_memory(shape, adapter, setup.method, setup.seq_len, setup.micro_batch,
                                      setup.world_size, setup.gradient_checkpointing, setup.grad_accum_steps)


def compare(setups=GRID, device: str = "cpu") -> list[dict]:
    """Measured and planned bytes, their ratio and both breakdowns, per set-up."""
    rows = []
    for setup in setups:
        measured = measure(setup, device)
        planned = estimate(setup)
        rows.append({
            "setup": setup.name, "measured_bytes": measured.peak_bytes, "planner_bytes": planned.allocated_bytes,
            "ratio": planned.allocated_bytes / measured.peak_bytes,
            "measured_phase": measured.peak_phase, "planner_phase": planned.peak_phase,
            "measured": measured.components, "planner": {
                "weights": planned.weights_bytes, "gradients": planned.grads_bytes,
                "optimizer": planned.optimizer_bytes, "activations": planned.activations_bytes,
                "temporaries": planned.temporaries_bytes},
            "seconds": measured.seconds,
        })
        print(_row_line(len(rows), rows[-1]), flush=True)
    return rows


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def _parts(parts: dict) -> str:
    short = {"weights": "W", "gradients": "G", "optimizer": "O", "activations": "A", "temporaries": "T"}
    return " ".join(f"{short[k]} {_gb(parts[k])}" for k in short)


def _row_line(i: int, row: dict) -> str:
    return (f"{i:2d} {row['setup']:42s} measured {_gb(row['measured_bytes']):>7s} GB  planner "
            f"{_gb(row['planner_bytes']):>7s} GB  ratio {row['ratio']:.3f}  ({row['seconds']:.0f} s)")


def _cpu() -> str:
    """This machine's CPU model, cores and load (the measurement itself does not depend on them)."""
    import os

    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"CPU {model}, {os.cpu_count()} cores{load}"


def markdown(rows: list[dict], command: str, seconds: float) -> str:
    """MEMORY_RESULTS.md: date, device, command, versions, the table."""
    import peft
    import torch
    import transformers

    lo, hi = RATIO_BAND
    inside = sum(lo <= r["ratio"] <= hi for r in rows)
    lines = [
        "# Planner memory model vs the measured training step",
        "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Device: {_cpu()}; the step runs on fake tensors (torch FakeTensorMode) under "
        "torch.distributed._tools.mem_tracker.MemTracker, with the trainer's GPU precision policy (bf16 autocast, "
        "bf16 frozen LoRA base). No GPU was used.",
        f"- Command: `{command}` ({seconds:.0f} s wall)",
        f"- Versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
        f"- Result: {inside} of {len(rows)} ratios planner/measured within {lo:.2f}-{hi:.2f}.",
        "",
        "Allocated bytes on one GPU, GB (1e9). Parts at each peak: W weights, G gradients, O optimizer "
        "state, A layers' saved activations, T everything else (loss and output layer, backward "
        "temporaries, recomputation); the measured A/T split follows MemTracker's forward/backward "
        "attribution, the planner's its own, so compare the totals.",
        "",
        *_table(rows, "set-up"),
    ]
    return "\n".join(lines) + "\n"


def sharded_markdown(rows: list[dict], command: str, seconds: float) -> str:
    """The FSDP2 section of MEMORY_RESULTS.md: one rank of each world size, measured and planned."""
    import torch

    lo, hi = RATIO_BAND
    inside = sum(lo <= r["ratio"] <= hi for r in rows)
    lines = [
        SHARDED_SECTION,
        "",
        f"- Date: {datetime.date.today().isoformat()}; {_cpu()}; torch {torch.__version__}",
        f"- Command: `{command}` ({seconds:.0f} s wall)",
        "- Measured: rank 0 of a world of 2, 4 or 8 in one process, under torch's fake process group "
        "(`torch.testing._internal.distributed.fake_pg.FakeStore`, backend \"fake\": collectives return at once) "
        "and FakeTensorMode: the trainer's FSDP2 step (`trainer.distributed.shard_model`: each decoder layer and "
        "the model, bf16 MixedPrecisionPolicy, full logits), MemTracker around its second step, 2-3 layers "
        "extrapolated to the model's depth. Planner: `estimate_memory(num_gpus=N)`, which adds FSDP2's "
        "all-gathered root and layer and a layer's unsharded gradients (planner/memory.py).",
        f"- Result: {inside} of {len(rows)} ratios planner/measured within {lo:.2f}-{hi:.2f}.",
        "",
        *_table(rows, "set-up (per rank)"),
    ]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict], setup_header: str) -> list[str]:
    """The results table's lines: measured and planned bytes, their ratio and both breakdowns per row."""
    lines = [f"| # | {setup_header} | measured | planner | ratio | measured peak in | measured parts | planner parts |",
             "|---:|---|---:|---:|---:|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['setup']} | {_gb(r['measured_bytes'])} | {_gb(r['planner_bytes'])} | "
                     f"{r['ratio']:.3f} | {r['measured_phase']} | {_parts(r['measured'])} | {_parts(r['planner'])} |")
    return lines


def write_section(path: Path, section: str) -> None:
    """Put the FSDP2 section at the end of the results file, replacing the one there."""
    text = path.read_text() if path.exists() else ""
    kept = text.split("\n" + SHARDED_SECTION)[0].rstrip("\n")
    path.write_text(kept + "\n\n" + section)


# ---- fitting planner/memory.py's MEASURED constants ------------------------------------------

_LLAMA = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
          "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False}
_QWEN3 = {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
          "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False}
_QWEN3_MOE = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
              "moe_intermediate_size": 768, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
              "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
              "vocab_size": 151936, "tie_word_embeddings": False}
# Shapes varied one dimension at a time around Llama-3.1-8B, Qwen3-8B and Qwen3-30B-A3B (the
# grid's real shapes are not among them: the grid tests the fit).
DESIGN_SHAPES = {
    "llama": _LLAMA, "llama-h": {**_LLAMA, "hidden_size": 5120}, "llama-i": {**_LLAMA, "intermediate_size": 18432},
    "llama-q": {**_LLAMA, "num_attention_heads": 64}, "llama-V": {**_LLAMA, "vocab_size": 64000},
    "qwen3": _QWEN3, "qwen3-q": {**_QWEN3, "num_attention_heads": 64},
    "moe": _QWEN3_MOE, "moe-E": {**_QWEN3_MOE, "num_experts": 64}, "moe-k": {**_QWEN3_MOE, "num_experts_per_tok": 4},
    "moe-mi": {**_QWEN3_MOE, "moe_intermediate_size": 1536}, "moe-h": {**_QWEN3_MOE, "hidden_size": 3072},
}
# (seq_len, micro_batch): 2048 tokens for every shape; the base shapes also at 512 tokens in one
# row (no padding mask), and 8192 and 16384 in four (two and four of the loss's CHUNK_TOKENS chunks).
DESIGN_BATCH = (1024, 2)
DESIGN_BATCHES = ((512, 1), (2048, 4), (4096, 4))
DESIGN_BASES = ("llama", "qwen3", "moe")
# A checkpointed layer keeps its input only, and its recomputation is one layer's activations
# (measured without checkpointing): the hidden size and the batch are the dimensions that matter.
CHECKPOINT_SHAPES = ("llama", "llama-h", "qwen3", "moe", "moe-h")
# fp32 weights feed torch._grouped_mm, which the CPU fakes cannot run: full (mixed) is measured on dense shapes.
DENSE_ONLY_METHODS = ("full",)


def _design():
    """(method, checkpointing, shape name, config, seq_len, micro_batch) of every design point."""
    for method in ("lora", "full_bf16", "full"):
        for checkpointing in (False, True):
            for name, config in DESIGN_SHAPES.items():
                if (checkpointing and name not in CHECKPOINT_SHAPES) or (
                        method in DENSE_ONLY_METHODS and shape_from_config({**config, "num_hidden_layers": 2}).is_moe):
                    continue
                batches = (DESIGN_BATCH,) + (DESIGN_BATCHES if name in DESIGN_BASES else ())
                for seq_len, micro_batch in batches:
                    yield method, checkpointing, name, config, seq_len, micro_batch


def measure_design(path: Path | None = None) -> list[dict]:
    """Each design point measured at 2 and 3 layers: per phase, the total and its parts. With
    `path`, records are saved there as they come and a rerun measures only the missing points."""
    from trainer.memory import measure_step_memory, with_layers

    records = json.loads(path.read_text()) if path and path.exists() else []
    done = {(r["method"], r["checkpointing"], r["shape"], r["seq_len"], r["micro_batch"]) for r in records}
    for method, checkpointing, name, config, seq_len, micro_batch in _design():
        if (method, checkpointing, name, seq_len, micro_batch) in done:
            continue
        kind = "moe" if shape_from_config({**config, "num_hidden_layers": 2}).is_moe else "dense"
        runs = [measure_step_memory(with_layers(config, {kind: n}), method, seq_len=seq_len, micro_batch=micro_batch,
                                    gradient_checkpointing=checkpointing)
                for n in (2, 3)]
        records.append({"method": method, "checkpointing": checkpointing, "shape": name, "config": config,
                        "kind": kind, "seq_len": seq_len, "micro_batch": micro_batch,
                        "runs": [{p.phase: {"total": p.total_bytes, **p.components} for p in r.phases} for r in runs]})
        if path:
            path.write_text(json.dumps(records))
        print(f"design {method:9s} ckpt={checkpointing!s:5s} {name:9s} {micro_batch}x{seq_len}", flush=True)
    return records


def _rest(record: dict, layers: int, phase: str, outer_grads: dict[str, float]) -> float:
    """Bytes of the largest of the measured phases behind the planner's `phase` beyond weights,
    optimizer state and the gradients the planner counts there (planner.memory.estimate_memory)."""
    run = record["runs"][layers - 2]
    final = run["optimizer"]["gradients"]
    held = {"forward": outer_grads["unembedding"], "backward": outer_grads["unembedding"],
            "bottom": final - outer_grads["embedding"], "end": final}[phase]
    return max(run[p]["total"] - run[p]["weights"] - run[p]["optimizer"] - held for p in _PHASE_GROUPS[phase]
               if p in run)


_PHASE_GROUPS = {
    "forward": ("forward",),
    "backward": ("backward: loss and head", "backward: top layer"),
    "bottom": ("backward: bottom layer",),
    "end": ("backward: embedding", "optimizer"),
}


def fit(records: list[dict]) -> dict:
    """Non-negative least squares of each method's per-layer and per-phase bytes on the shape
    features (planner.memory.layer_features / step_features); returns MEASURED's entries."""
    import numpy as np
    from scipy.optimize import nnls

    from trainer.memory import with_layers

    out = {}
    for key in [(m, c) for m in ("lora", "full_bf16", "full") for c in (False, True)]:
        group = [r for r in records if (r["method"], r["checkpointing"]) == key]
        if not group:
            continue
        shapes = [shape_from_config(with_layers(r["config"], {r["kind"]: 2})) for r in group]
        grad_bytes = memory_mod.METHODS[key[0]].grad_bytes_per_param if key[0].startswith("full") else 0.0
        outer = [{role: sum(m.params for m in s.matrices if m.role == role) * grad_bytes
                  for role in ("embedding", "unembedding")} for s in shapes]
        feats = [memory_mod.layer_features(s, r["kind"], r["seq_len"], r["micro_batch"]) for s, r in zip(shapes, group, strict=True)]
        slope = [_rest(r, 3, "forward", o) - _rest(r, 2, "forward", o) for r, o in zip(group, outer, strict=True)]
        names = memory_mod.CHECKPOINT_LAYER_FEATURES if key[1] else memory_mod.LAYER_FEATURES
        layer = _nnls(np, nnls, names, feats, slope)
        full_layer = out[(key[0], False)].layer if key[1] else layer
        step_feats = [memory_mod.step_features(s, r["seq_len"], r["micro_batch"], memory_mod._dot(full_layer, f))
                      for s, r, f in zip(shapes, group, feats, strict=True)]
        phases = {}
        for phase in memory_mod.PHASES:
            # The value at zero layers, extrapolated from 2 and 3 (the layers' part is `layer`).
            icpt = [3 * _rest(r, 2, phase, o) - 2 * _rest(r, 3, phase, o) for r, o in zip(group, outer, strict=True)]
            phases[phase] = _nnls(np, nnls, memory_mod.STEP_FEATURES, step_feats, icpt)
        out[key] = memory_mod.StepBytes(layer, phases, f"measured: {memory_mod.FIT_COMMAND}")
        print(f"fit {key}: {len(group)} design points", flush=True)
    return out


# A coefficient whose largest contribution over the design is below this is noise of the fit.
NEGLIGIBLE_BYTES = 1e6


def _nnls(np, nnls, names, feats, target) -> dict[str, float]:
    used = [n for n in names if any(f[n] for f in feats)]
    scale = np.array([max(abs(f[n]) for f in feats) for n in used])
    matrix = np.array([[f[n] for n in used] for f in feats]) / scale
    coef, _ = nnls(matrix, np.array(target, dtype=float))
    return {n: float(f"{c / s:.4g}") for n, c, s in zip(used, coef, scale, strict=True) if c > NEGLIGIBLE_BYTES}


def print_measured(measured: dict) -> None:
    """planner/memory.py's MEASURED as Python source."""
    print("MEASURED: dict[tuple[str, bool], StepBytes] = {")
    for (method, checkpointing), sb in measured.items():
        print(f"    ({method!r}, {checkpointing}): StepBytes(")
        print(f"        layer={sb.layer!r},")
        print("        phases={")
        for phase, coef in sb.phases.items():
            print(f"            {phase!r}: {coef!r},")
        print("        },")
        print("        source=SOURCE,")
        print("    ),")
    print("}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma list of 1-based grid rows to run (no results file written)")
    parser.add_argument("--device", default="cpu", help="device the fake tensors live on (cpu, or cuda on a GPU machine)")
    parser.add_argument("--fit", action="store_true", help="measure the design shapes and print MEASURED")
    parser.add_argument("--sharded", action="store_true",
                        help="one FSDP2 rank of 2, 4 and 8 (SHARDED_GRID); rewrites the results file's FSDP2 section")
    parser.add_argument("--design-json", help="with --fit: keep the design measurements in this file (a rerun reuses them)")
    parser.add_argument("--out", default=str(RESULTS), help="results file (default benchmarks/MEMORY_RESULTS.md)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.fit:
        print_measured(fit(measure_design(Path(args.design_json) if args.design_json else None)))
        return 0
    grid = SHARDED_GRID if args.sharded else GRID
    setups = grid if not args.only else tuple(grid[int(i) - 1] for i in args.only.split(","))
    rows = compare(setups, args.device)
    lo, hi = RATIO_BAND
    outside = [r["setup"] for r in rows if not lo <= r["ratio"] <= hi]
    print(f"{len(rows) - len(outside)} of {len(rows)} ratios within {lo:.2f}-{hi:.2f}"
          + (f"; outside: {', '.join(outside)}" if outside else ""))
    if not args.only:
        command = ("python benchmarks/memory_model.py" + (" --sharded" if args.sharded else "")
                   + (f" --device {args.device}" if args.device != "cpu" else ""))
        seconds = time.perf_counter() - started
        if args.sharded:
            write_section(Path(args.out), sharded_markdown(rows, command, seconds))
        else:  # the single-GPU table; the FSDP2 section is kept
            old = Path(args.out).read_text() if Path(args.out).exists() else ""
            section = old[old.index(SHARDED_SECTION):] if SHARDED_SECTION in old else ""
            Path(args.out).write_text(markdown(rows, command, seconds) + ("\n" + section if section else ""))
        print(f"wrote {args.out}")
    return 0 if not outside else 1


if __name__ == "__main__":
    sys.exit(main())
