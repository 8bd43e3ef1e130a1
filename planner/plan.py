"""The capacity plan: one call that puts shapes, LoRA counts, capacity, advice, FLOPs and memory
together into a frozen, JSON-serialisable `CapacityPlan`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from data.errors import UserError
from planner import advice as advice_mod
from planner import capacity as capacity_mod
from planner import flops as flops_mod
from planner import memory as memory_mod
from planner.gpus import get_gpu
from planner.lengths import LengthPlan, plan_lengths
from planner.lora import LoraCount, count_lora_params, count_run_lora, select_targets
from planner.shapes import ModelShape, load_shape

DEFAULT_SEQ_LEN = 2048  # a common SFT max length; pass --seq-len for yours
DEFAULT_BATCH_SIZE = 32  # the blog's "small penalty" batch size
DEFAULT_GPU = "H100-80GB-SXM"
CHART_GPU_COUNTS = (1, 2, 4, 8)


@dataclass(frozen=True)
class CapacityPlan:
    """Everything the planner says about one LoRA run; `to_dict()` is the plan.json."""

    model: dict
    rank: int
    targets: str
    expert_rank_divisor: str
    lora: LoraCount
    dataset: dict | None
    capacity: capacity_mod.CapacityVerdict | None
    rank_curve: tuple[tuple[int, int], ...]
    advice: advice_mod.Advice
    flops: flops_mod.FlopsEstimate
    run: flops_mod.RunTime | None
    memory: tuple[memory_mod.MemoryEstimate, ...]
    hardware: tuple[memory_mod.Fit, ...]
    settings: dict
    constants: tuple[dict, ...]
    notes: tuple[str, ...]
    lengths: LengthPlan | None = None
    measured: tuple[dict, ...] = ()

    @property
    def adapter_params(self) -> int:
        return self.lora.total

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_params": self.adapter_params,
            "model": self.model,
            "rank": self.rank,
            "expert_rank": self.lora.expert_rank,
            "targets": self.targets,
            "expert_rank_divisor": self.expert_rank_divisor,
            "lora": self.lora.to_dict(),
            "dataset": self.dataset,
            "capacity": self.capacity.to_dict() if self.capacity else None,
            "rank_curve": [list(point) for point in self.rank_curve],
            "advice": self.advice.to_dict(),
            "flops": self.flops.to_dict(),
            "run": self.run.to_dict() if self.run else None,
            "memory": [m.to_dict() for m in self.memory],
            "hardware": [f.to_dict() for f in self.hardware],
            "settings": self.settings,
            "constants": list(self.constants),
            "notes": list(self.notes),
            "lengths": self.lengths.to_dict() if self.lengths else None,
            "measured": list(self.measured),
        }


def _constants(bits_per_param: float, bits_source: str, short_run: dict, mfu: float) -> tuple[dict, ...]:
    """The constants this plan used, each with its source: a literature prior, our study's
    measurement (planner/calibration.json, with the prior beside it), or the caller's value."""
    c = []

    def add(name, value, source, **extra):
        c.append({"name": name, "value": value, "source": source, **extra})

    add("bits_per_param", bits_per_param, bits_source, prior=capacity_mod.PRIOR_BITS_PER_PARAM,
        prior_source=capacity_mod.PRIOR_BITS_PER_PARAM_SOURCE)
    add("low_regret_ratio", capacity_mod.LOW_REGRET_RATIO, "planner.capacity: capacity >= 2 × dataset bits")
    add("borderline_ratio", capacity_mod.BORDERLINE_RATIO, "planner.capacity: capacity >= 1 × dataset bits")
    add("lora_over_fullft_lr", advice_mod.LORA_OVER_FULLFT_LR, "LoRA Without Regret; tinker-cookbook")
    add("short_run_lora_over_fullft_lr", short_run["value"], short_run["source"], prior=short_run["prior"],
        prior_source=short_run["prior_source"])
    add("lr_exponent_by_family", dict(advice_mod.LR_EXPONENT_BY_FAMILY), "tinker-cookbook hyperparam_utils.get_lr")
    add("lora_alpha", advice_mod.LORA_ALPHA, "LoRA Without Regret; peft default init")
    add("batch_thresholds", [advice_mod.BATCH_SMALL_PENALTY_ABOVE, advice_mod.BATCH_STRONG_WARNING_ABOVE],
        "LoRA Without Regret; TRL docs; seed notes")
    add("fullft_flops_per_weight", flops_mod.FULLFT_FLOPS_PER_WEIGHT, "Kaplan et al. 2020")
    add("frozen_flops_per_weight", flops_mod.FROZEN_FLOPS_PER_WEIGHT, "no weight gradient (DESIGN.md)")
    add("adapter_flops_per_param", flops_mod.ADAPTER_FLOPS_PER_PARAM, "DESIGN.md")
    add("mfu", mfu, "assumed (default 0.4); pass --mfu with your measured value")
    for m in memory_mod.METHODS.values():
        add(f"bytes_per_param.{m.name}", {k: v for k, v in dataclasses.asdict(m).items() if k.endswith("param")},
            m.source)
    for (method, checkpointing), measured in memory_mod.MEASURED.items():
        add(f"step_bytes.{method}{'.checkpointing' if checkpointing else ''}",
            {"layer": measured.layer, "phases": measured.phases}, measured.source)
    add("chunk_tokens", memory_mod.CHUNK_TOKENS, "trainer/loss.py: positions per chunk of the completion loss")
    add("overhead_fixed_bytes", memory_mod.OVERHEAD_FIXED_BYTES, "prior: CUDA context and workspaces")
    add("overhead_fraction", memory_mod.OVERHEAD_FRACTION, "prior: allocator fragmentation")
    return tuple(c)


def _memory_at_fits(shape: ModelShape, adapter_params: int, hardware: tuple[memory_mod.Fit, ...], seq_len: int,
                    batch_size: int) -> tuple[memory_mod.MemoryEstimate, ...]:
    """Each method's memory per GPU at CHART_GPU_COUNTS and at its recommended GPU count, with the
    micro-batch and checkpointing the plan recommends (the micro-batch capped by batch / GPUs).
    A method that fits nowhere is shown at micro-batch 1 with gradient checkpointing (its least)."""
    counts = sorted({*CHART_GPU_COUNTS, *(f.num_gpus for f in hardware if f.num_gpus)})
    rows = []
    for fit in hardware:
        micro, checkpointing = (fit.micro_batch, fit.gradient_checkpointing) if fit.num_gpus else (1, True)
        for n in counts:
            b = min(micro, max(1, batch_size // n))
            accum = -(-batch_size // (b * n))
            rows.append(memory_mod.estimate_memory(shape, adapter_params, fit.method, seq_len, b, n, checkpointing,
                                                   accum))
    return tuple(rows)


def _positive(name: str, value, integer: bool = True) -> None:
    if value is None:
        return
    if (integer and int(value) != value) or value <= 0:
        raise UserError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}.")


def _profile_dict(profile: Any) -> dict:
    if dataclasses.is_dataclass(profile):
        return dataclasses.asdict(profile)
    return dict(vars(profile))


def build_plan(
    model: str | dict | ModelShape,
    rank: int,
    *,
    targets: str | list[str] = "all",
    expert_rank_divisor: str = "active",
    target_unembedding: bool = False,
    profile: Any = None,
    bits_per_param: float | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    packing: bool = False,
    gpu: str = DEFAULT_GPU,
    num_gpus: int | None = None,
    fullft_lr: float | None = None,
    steps: int | None = None,
    epochs: float = 1.0,
    mfu: float = flops_mod.DEFAULT_MFU,
    notes: tuple[str, ...] = (),
    calibration: dict | None = None,
) -> CapacityPlan:
    """Plan a LoRA run of `model` at `rank`.

    Args:
        model: a catalog name, config.json path, config dict, Hub id, or a `ModelShape`.
        rank: LoRA rank of the non-expert matrices.
        targets: `all`, `attention`, `mlp` or matrix names (list or comma-separated).
        expert_rank_divisor: `active` (blog), `total` (peft docs) or `none`.
        target_unembedding: also adapt lm_head.
        profile: a `planner.profile.DatasetProfile`, or None for no capacity verdict.
        bits_per_param: adapter capacity per parameter; None: the study's measurement when
            planner/calibration.json has one, else the 2 bits/param prior.
        seq_len, batch_size: max_length (tokens per sequence) and sequences per optimizer step (effective).
        packing: the run packs examples into rows of seq_len (else each micro-batch is padded to
            its longest example); with a profile, memory is sized at the row width this gives.
        gpu, num_gpus: the GPU kind, and a fixed count (None: the fewest that fit).
        fullft_lr: the FullFT LR to scale (None: tinker-cookbook's formula).
        steps: optimizer steps (None: from the profile and `epochs` when there is one).
        epochs: passes over the dataset.
        mfu: assumed model-FLOPs utilisation for run times.
        notes: extra notes to record (e.g. from the CLI).
        calibration: the calibration record (None: the packaged planner/calibration.json; {}: priors only).

    Raises:
        UserError: any bad input, before any work.
    """
    _positive("rank", rank)
    _positive("seq_len", seq_len)
    _positive("batch_size", batch_size)
    _positive("num_gpus", num_gpus)
    _positive("steps", steps)
    _positive("epochs", epochs, integer=False)
    _positive("bits_per_param", bits_per_param, integer=False)
    if not 0 < mfu <= 1:
        raise UserError(f"mfu must be in (0, 1], got {mfu!r}.")
    if bits_per_param is None:
        chosen = capacity_mod.bits_per_param_constant(calibration)
        bits_per_param, bits_source = chosen.value, chosen.source
    else:
        bits_source = "given by the caller (--bits-per-param)"
    shape = model if isinstance(model, ModelShape) else load_shape(model)
    gpu_spec = get_gpu(gpu)
    lora = count_run_lora(shape, rank, targets, expert_rank_divisor, target_unembedding)

    def params_at(r: int) -> int:
        return count_lora_params(shape, r, targets, expert_rank_divisor, target_unembedding).total

    capacity = None
    dataset = None
    tokens = None
    if profile is not None:
        dataset = _profile_dict(profile)
        chosen = select_targets(shape, targets, target_unembedding)
        max_rank = max(min(m.d_in, m.d_out) for m in chosen) * lora.divisor_value
        capacity = capacity_mod.assess_capacity(params_at, rank, max_rank, profile, bits_per_param,
                                                bits_per_param_source=bits_source)
        if steps is None and int(profile.examples) > 0:
            steps = math.ceil(epochs * int(profile.examples) / batch_size)
        if profile.total_tokens:  # None for RL profiles
            tokens = round(epochs * int(profile.total_tokens))
    if tokens is None and steps is not None:
        tokens = steps * batch_size * seq_len  # every sequence full: an upper bound
    token_lengths = getattr(profile, "token_lengths", ())
    lengths = plan_lengths(token_lengths, seq_len, packing) if token_lengths else None
    memory_seq_len = lengths.memory_seq_len if lengths else seq_len

    advice = advice_mod.advise(shape, batch_size, fullft_lr, steps, calibration)
    flops = flops_mod.estimate_flops(shape, lora, seq_len)
    run = None
    if tokens:
        run = flops_mod.estimate_run_time(flops, tokens, gpu_spec, num_gpus or 1, mfu)
    methods = tuple(memory_mod.METHODS)
    hardware = tuple(
        memory_mod.fit_hardware(shape, lora.total, method, gpu_spec, memory_seq_len, batch_size, num_gpus)
        for method in methods
    )
    memory = _memory_at_fits(shape, lora.total, hardware, memory_seq_len, batch_size)
    all_notes = list(notes)
    if shape.is_moe:
        all_notes.append(
            f"Expert rank {lora.expert_rank} = max(1, {rank} // {lora.divisor_value}) "
            f"(divisor '{expert_rank_divisor}': " + {
                "active": "experts per token, the blog's rule",
                "total": "all experts, peft's docs",
                "none": "no division"}[expert_rank_divisor] + ")."
        )
        if lora.unadapted:
            all_notes.append(
                f"peft re-targets gate_proj/up_proj/down_proj of {shape.model_type} models to the fused experts "
                f"(transformers 5 weight conversion), so {', '.join(lora.unadapted)} get no adapter: the count is "
                "what the trainer builds; the blog's rule adapts every MLP."
            )
        if targets != "all-linear":
            peft_all = count_lora_params(shape, rank, "all-linear", expert_rank_divisor, target_unembedding).total
            if peft_all != lora.total:
                all_notes.append(
                    f"peft's own target_modules='all-linear' would build {peft_all:,} adapter parameters "
                    f"({peft_all / lora.total:.2f}x this plan): every expert at rank {rank} instead of the blog's "
                    f"rank per expert {lora.expert_rank}, experts.gate_up_proj at rank {2 * rank} (gate and up fused), "
                    "and the router adapted. Plan it with --targets all-linear."
                )
        if lora.by_role.get("routed_expert"):
            all_notes.append(
                "peft adapts the fused 3-D expert weights through target_parameters, which rebuilds W + ΔW "
                "for all experts with torch parametrize on every forward and keeps it for the backward: 2 bytes per "
                "expert weight per layer in the LoRA memory (measured), and FLOPs per step that are not modelled."
            )
    if dataset is not None and dataset.get("format") == "rl":
        all_notes.append(
            "RL: steps = episodes / batch (batch = prompts per step × samples per prompt); the run time counts "
            "the policy-gradient passes over batch × seq_len tokens per step, not the sampling of the episodes.")
    all_notes.append("Attention-score FLOPs count the full s×s matrix (MFU convention); causal kernels do about half.")
    all_notes.append("Memory: allocated bytes at the step's peak from constants measured on the trainer's own step "
                     "(planner/memory.py); CUDA context, kernel workspaces and fragmentation are a stated overhead. "
                     "QLoRA (not measured: the trainer has no QLoRA path) assumes every matrix but the embedding and "
                     "lm_head is 4-bit and LoRA's activations.")
    settings = {
        "seq_len": seq_len, "memory_seq_len": memory_seq_len, "packing": packing, "batch_size": batch_size,
        "gpu": gpu_spec.name, "num_gpus": num_gpus,
        "steps": steps, "epochs": epochs, "tokens": tokens, "mfu": mfu, "bits_per_param": bits_per_param,
        "bits_per_param_source": bits_source, "target_unembedding": target_unembedding,
    }
    return CapacityPlan(
        model=shape.summary(),
        rank=rank,
        targets=targets if isinstance(targets, str) else ",".join(targets),
        expert_rank_divisor=expert_rank_divisor,
        lora=lora,
        dataset=dataset,
        capacity=capacity,
        rank_curve=tuple((r, params_at(r)) for r in capacity_mod.POW2_RANKS),
        advice=advice,
        flops=flops,
        run=run,
        memory=memory,
        hardware=hardware,
        settings=settings,
        constants=_constants(bits_per_param, bits_source,
                             advice_mod.short_run_multiplier_constant(calibration).to_dict(), mfu),
        notes=tuple(all_notes),
        lengths=lengths,
    )
