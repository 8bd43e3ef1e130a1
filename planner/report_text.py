"""The capacity plan as text: the lines `lowregret plan` prints (and the pipeline logs), and the
number formats the report shares with them."""

from __future__ import annotations

from planner.plan import CapacityPlan
from planner.report_charts import si_number as _num


def gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:.1f} GB"


def duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def wall_hours(plan: CapacityPlan, fit) -> float:
    """Wall hours of the run on the GPUs a method needs (LoRA FLOPs for lora/qlora)."""
    r = plan.run
    gpu_hours = r.fullft_gpu_hours if fit.method.startswith("full") else r.lora_gpu_hours
    return gpu_hours / fit.num_gpus


def _lengths_line(n) -> str:
    """The token-length distribution, what max_length cuts, and the row width memory is sized at."""
    width = ("packed rows of max_length" if n.packing else
             "each micro-batch padded to its longest example, at most max_length")
    return (f"Lengths ({n.examples:,} examples, tokens): p50 {n.p50_tokens:,}, p95 {n.p95_tokens:,}, max "
            f"{n.max_tokens:,}; max_length {n.max_length:,} truncates {n.truncated_share:.1%}; suggested max_length "
            f"{n.suggested_max_length:,} (truncates {n.suggested_truncated_share:.1%}); memory sized at "
            f"{n.memory_seq_len:,} tokens per row ({width})")


def summary_lines(plan: CapacityPlan) -> list[str]:
    """The plan in a few readable lines (the CLI's output without --json)."""
    m, lora = plan.model, plan.lora
    lines = [
        f"Model {m['name']} ({m['model_type']}): {_num(m['total_params'])} params"
        + (f", {_num(m['active_params'])} active per token" if m["num_experts"] else ""),
        f"LoRA rank {plan.rank}" + (f" (experts {lora.expert_rank}, divisor '{plan.expert_rank_divisor}' = "
                                     f"{lora.divisor_value})" if m["num_experts"] else "")
        + f", targets {plan.targets}: {plan.adapter_params:,} adapter params "
        + "(" + ", ".join(f"{role} {n:,}" for role, n in lora.by_role.items()) + ")",
    ]
    d = plan.dataset
    if d is not None:
        tokens = ("" if d["completion_tokens"] is None else
                  f", {d['completion_tokens']:,} completion tokens of {d['total_tokens']:,}")
        lines.append(f"Dataset {d['source']} ({d['format']}): {d['examples']:,} examples{tokens}, "
                     f"{_num(d['information_bits'])} bits ({d['information_method']})"
                     + (f", tokenizer {d['tokenizer']}" if d["tokenizer"] else ""))
    if plan.lengths is not None:
        lines.append(_lengths_line(plan.lengths))
    c = plan.capacity
    if c is not None:
        ratio = "inf" if c.capacity_over_data is None else f"{c.capacity_over_data:.2f}"
        lines.append(
            f"Capacity {_num(c.capacity_bits)} bits ({c.bits_per_param:.3g} bits/param) vs dataset "
            f"{_num(c.dataset_bits)} bits ({c.information_method}): ratio {ratio} -> {c.verdict.upper()} "
            f"(low-regret >= {c.low_regret_ratio:g}x, borderline >= {c.borderline_ratio:g}x)"
        )
        lines.append(f"Smallest low-regret rank: {c.min_rank_pow2 or 'none <= 512'} (power of two), "
                     f"{c.min_rank_exact or 'none'} (exact)")
        if c.bits_per_param != c.prior_bits_per_param:
            lines.append(f"Bits/param {c.bits_per_param:.3g}: {c.bits_per_param_source}. Under the "
                         f"{c.prior_bits_per_param:g} bits/param prior: {c.prior_verdict.upper()}, smallest rank "
                         f"{c.prior_min_rank_pow2 or 'none <= 512'} (power of two)")
        if c.completion_tokens is not None:
            lines.append(f"Tinker's rule (adapter params >= {c.completion_tokens:,} completion tokens): "
                         f"{'holds' if c.tinker_rule_holds else 'fails'}; smallest rank "
                         f"{c.tinker_min_rank_pow2 or '-'} (power of two), {c.tinker_min_rank_exact or '-'} (exact)")
    else:
        lines.append("No dataset given: pass --dataset for a capacity verdict.")
    lines += [f"Advice: {msg}" for msg in plan.advice.messages]
    f = plan.flops
    lines.append(f"FLOPs/token at seq_len {f.seq_len}: FullFT {_num(f.fullft_flops_per_token)}, LoRA "
                 f"{_num(f.lora_flops_per_token)} (LoRA/FullFT {f.lora_over_fullft:.3f})")
    if plan.run is not None:
        r = plan.run
        lines.append(f"Run of {_num(r.tokens)} tokens on {r.gpu} at MFU {r.mfu:g}: FullFT "
                     f"{r.fullft_gpu_hours:.3g} GPU-hours, LoRA {r.lora_gpu_hours:.3g} GPU-hours")
    lines.append(f"Fewest {plan.settings['gpu']} per method ({plan.settings['memory_seq_len']} tokens per row, "
                 f"batch {plan.settings['batch_size']}, FSDP2 sharding):")
    for fit in plan.hardware:
        if fit.num_gpus is None:
            lines.append(f"  {fit.method:9s}: does not fit on {plan.settings['num_gpus'] or 'up to 1024'} x {fit.gpu}")
        else:
            lines.append(f"  {fit.method:9s}: {fit.num_gpus} x {fit.gpu}, micro-batch {fit.micro_batch}, grad accum "
                         f"{fit.grad_accum_steps}{', gradient checkpointing' if fit.gradient_checkpointing else ''}"
                         f" ({gb(fit.total_bytes)}/GPU)"
                         + (f"; effective batch {fit.effective_batch}" if fit.effective_batch != plan.settings["batch_size"]
                            else "")
                         + (f"; {duration(wall_hours(plan, fit) * 3600)} wall" if plan.run else ""))
    if plan.measured:
        lines.append("Measured peak per GPU (the trainer's own step on fake tensors under PyTorch's MemTracker; "
                     "allocated bytes, without CUDA context, kernel workspaces or fragmentation):")
        lines += [measured_line(row) for row in plan.measured]
    return lines


def measured_line(row: dict) -> str:
    where = (f"{row['num_gpus']} GPU{'s' if row['num_gpus'] > 1 else ''}, micro-batch {row['micro_batch']}, "
             f"grad accum {row['grad_accum_steps']}" + (", gradient checkpointing" if row["gradient_checkpointing"] else ""))
    if "error" in row:
        return f"  {row['method']:9s}: not measured ({row['error']}); planner {gb(row['planner_bytes'])} at {where}"
    layers = ", ".join(" + ".join(f"{n} {kind}" for kind, n in counts.items()) for counts in row["measured_layers"])
    return (f"  {row['method']:9s}: measured {gb(row['measured_bytes'])}, planner {gb(row['planner_bytes'])} "
            f"({row['ratio']:.2f}x) at {where}; peak in {row['peak_phase']}; layers run {layers}, extrapolated "
            f"to the model's depth; {row['seconds']:.0f} s")
