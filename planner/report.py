"""Capacity-plan reports: a text summary, Markdown, self-contained HTML and plan.json.

Charts are PNGs drawn with matplotlib's Agg backend (imported only when a report is written).
All files are written to a temporary folder first and moved into place only when every one of
them exists, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import tempfile
from pathlib import Path

from planner.gpus import get_gpu
from planner.plan import CapacityPlan

CHARTS = {
    "capacity.png": "Adapter capacity (bits) vs dataset bits over ranks 1-512",
    "memory.png": "Memory per GPU by method and GPU count (micro-batch 1)",
}
_MEMORY_PARTS = ("weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "temporaries_bytes",
                 "overhead_bytes")


def _num(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:.1f} GB"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _hours(plan: CapacityPlan, fit) -> float:
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
                 f"batch {plan.settings['batch_size']}, FSDP/ZeRO-3 sharding):")
    for fit in plan.hardware:
        if fit.num_gpus is None:
            lines.append(f"  {fit.method:9s}: does not fit on {plan.settings['num_gpus'] or 'up to 1024'} x {fit.gpu}")
        else:
            lines.append(f"  {fit.method:9s}: {fit.num_gpus} x {fit.gpu}, micro-batch {fit.micro_batch}, grad accum "
                         f"{fit.grad_accum_steps}{', gradient checkpointing' if fit.gradient_checkpointing else ''}"
                         f" ({_gb(fit.total_bytes)}/GPU)"
                         + (f"; effective batch {fit.effective_batch}" if fit.effective_batch != plan.settings["batch_size"]
                            else "")
                         + (f"; {_duration(_hours(plan, fit) * 3600)} wall" if plan.run else ""))
    if plan.measured:
        lines.append("Measured peak per GPU (the trainer's own step on fake tensors under PyTorch's MemTracker; "
                     "allocated bytes, without CUDA context, kernel workspaces or fragmentation):")
        lines += [_measured_line(row) for row in plan.measured]
    return lines


def _measured_line(row: dict) -> str:
    where = (f"{row['num_gpus']} GPU{'s' if row['num_gpus'] > 1 else ''}, micro-batch {row['micro_batch']}, "
             f"grad accum {row['grad_accum_steps']}" + (", gradient checkpointing" if row["gradient_checkpointing"] else ""))
    if "error" in row:
        return f"  {row['method']:9s}: not measured ({row['error']}); planner {_gb(row['planner_bytes'])} at {where}"
    layers = ", ".join(" + ".join(f"{n} {kind}" for kind, n in counts.items()) for counts in row["measured_layers"])
    return (f"  {row['method']:9s}: measured {_gb(row['measured_bytes'])}, planner {_gb(row['planner_bytes'])} "
            f"({row['ratio']:.2f}x) at {where}; peak in {row['peak_phase']}; layers run {layers}, extrapolated "
            f"to the model's depth; {row['seconds']:.0f} s")


def _capacity_chart(plan: CapacityPlan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = plan.settings["bits_per_param"]
    ranks = [r for r, _ in plan.rank_curve]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(ranks, [p * bits for _, p in plan.rank_curve], "o-", label=f"adapter capacity ({bits:.3g} bits/param)")
    c = plan.capacity
    if c is not None and c.dataset_bits > 0:
        ax.axhline(c.dataset_bits, color="tab:red", label=f"dataset bits ({c.information_method})")
        ax.axhline(c.low_regret_ratio * c.dataset_bits, color="tab:red", ls="--",
                   label=f"low-regret threshold ({c.low_regret_ratio:g}x)")
    ax.axvline(plan.rank, color="grey", ls=":", label=f"planned rank {plan.rank}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("bits")
    ax.set_title(f"{plan.model['name']}: capacity vs data")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _memory_chart(plan: CapacityPlan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plan.memory
    labels = [f"{m.method}\n{m.num_gpus} GPU" for m in rows]
    fig, ax = plt.subplots(figsize=(max(7.5, 0.45 * len(rows) + 2), 4.2))
    bottom = [0.0] * len(rows)
    for part in _MEMORY_PARTS:
        values = [getattr(m, part) / 1e9 for m in rows]
        ax.bar(range(len(rows)), values, bottom=bottom, label=part.removesuffix("_bytes"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    gpu = get_gpu(plan.settings["gpu"])
    ax.axhline(gpu.memory_bytes / 1e9, color="black", ls="--", label=f"{gpu.name} memory")
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=90)
    ax.set_ylabel("GB per GPU")
    ax.set_title(f"{plan.model['name']}: memory at {plan.settings['memory_seq_len']} tokens per row, micro-batch 1")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_markdown(plan: CapacityPlan) -> str:
    lines = [f"# Capacity plan: {plan.model['name']}, LoRA rank {plan.rank}", ""]
    lines += [f"- {line}" for line in summary_lines(plan)]
    lines += ["", "## Charts", ""]
    lines += [f"![{title}]({name})" for name, title in CHARTS.items()]
    lines += ["", "## Adapter by matrix", "", "| matrix | role | d_in | d_out | copies | rank | params |",
              "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {m.name} | {m.role} | {m.d_in} | {m.d_out} | {m.count} | {m.rank} | {m.params:,} |"
              for m in plan.lora.matrices]
    lines += ["", "## Memory per GPU (micro-batch 1)", "",
              "| method | GPUs | weights | grads | optimizer | activations | temporaries | overhead | total |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {m.method} | {m.num_gpus} | " + " | ".join(_gb(getattr(m, p)) for p in _MEMORY_PARTS)
              + f" | {_gb(m.total_bytes)} |" for m in plan.memory]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in plan.notes]
    if plan.dataset:
        lines += [f"- Data: {n}" for n in plan.dataset["notes"]]
    lines += ["", "## Constants", "", "| name | value | source |", "|---|---|---|"]
    lines += [f"| {c['name']} | {c['value']} | {c['source']} |" for c in plan.constants]
    return "\n".join(lines) + "\n"


def _markdown_to_html(text: str, images: dict[str, str]) -> str:
    """Just enough Markdown for our own pages: headings, bullets, tables, and `![title](name)`
    images replaced by the `images[name]` data URI."""
    out, table = [], []

    def flush_table():
        if table:
            rows = [r.strip("|").split(" | ") for r in table if not set(r) <= set("|-: ")]
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>"
                                 for r in body) + "</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.startswith("!["):
            title, name = line[2:-1].split("](")
            out.append(f'<figure><img alt="{html.escape(title)}" src="{images[name]}">'
                       f"<figcaption>{html.escape(title)}</figcaption></figure>")
        elif line:
            out.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    return "\n".join(out)


def render_html(plan: CapacityPlan, charts: dict[str, bytes]) -> str:
    """A self-contained page: the Markdown report as HTML with the charts inlined as PNG."""
    images = {name: "data:image/png;base64," + base64.b64encode(data).decode() for name, data in charts.items()}
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Capacity plan: {html.escape(plan.model['name'])}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}"
        "</style></head><body>"
        f"{_markdown_to_html(render_markdown(plan), images)}</body></html>\n"
    )


def write_report(plan: CapacityPlan, out_dir: str | Path) -> dict[str, Path]:
    """Write plan.json, plan.md, plan.html and the chart PNGs into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the report is meant to be shared
    try:
        (tmp / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        _capacity_chart(plan, tmp / "capacity.png")
        _memory_chart(plan, tmp / "memory.png")
        (tmp / "plan.md").write_text(render_markdown(plan))
        charts = {name: (tmp / name).read_bytes() for name in CHARTS}
        (tmp / "plan.html").write_text(render_html(plan, charts))
        names = sorted(p.name for p in tmp.iterdir())
        if not out.exists():
            os.replace(tmp, out)
        else:  # keep the user's other files; each of ours replaces its old version atomically
            for name in names:
                os.replace(tmp / name, out / name)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {name: out / name for name in names}
