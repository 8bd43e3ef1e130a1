"""Capacity-plan reports: Markdown, self-contained HTML, the charts and plan.json (the text summary
is planner/report_text.py).

The report is a list of sections (`report_sections`: tables, charts, lists) rendered twice: as
plan.md and as one self-contained plan.html (styles inline, charts as base64 PNG) with the verdict
banner on top. Charts: planner/report_charts.py.
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
from dataclasses import dataclass
from pathlib import Path

from planner.gpus import get_gpu
from planner.plan import CapacityPlan
from planner.report_charts import capacity_chart, memory_chart
from planner.report_charts import si_number as _num
from planner.report_text import duration, gb, measured_line, wall_hours

CHARTS = ("capacity.png", "memory.png")
_MEMORY_PARTS = ("weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "temporaries_bytes",
                 "overhead_bytes")


# --------------------------------------------------------------------------- the page's sections


@dataclass(frozen=True)
class Table:
    """A table of already formatted cells; `numeric` columns are right-aligned."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[int, ...] = ()


@dataclass(frozen=True)
class Figure:
    """A chart file of the report and its caption."""

    name: str
    caption: str


@dataclass(frozen=True)
class Section:
    """One heading of the report and its blocks: paragraphs (str), bullet lists (tuple of str),
    tables and figures."""

    anchor: str
    title: str
    blocks: tuple


def data_name(plan: CapacityPlan) -> str:
    """What the plan was made for: the dataset source, RL episodes, or no data."""
    d = plan.dataset
    if d is None:
        return "no dataset"
    return f"RL, {d['examples']:,} episodes" if d["format"] == "rl" else d["source"]


def verdict(plan: CapacityPlan) -> tuple[str, str, str]:
    """(level, headline, explanation) of the banner; level is the capacity verdict or `none`."""
    c = plan.capacity
    if c is None:
        return ("none", "NO VERDICT: no dataset given",
                "Pass --dataset (or --rl-episodes) to compare the adapter's capacity with the data's information.")
    ratio = "unbounded" if c.capacity_over_data is None else f"{c.capacity_over_data:,.2f}x"
    measure = (f"capacity {_num(c.capacity_bits)} bits ({plan.adapter_params:,} adapter parameters x "
               f"{c.bits_per_param:g} bits) is {ratio} the data's {_num(c.dataset_bits)} bits ({c.information_method})")
    smallest = (f"the smallest low-regret rank is {c.min_rank_pow2} (power of two)" if c.min_rank_pow2
                else "no rank up to 512 reaches 2x the data")
    headline = {"low-regret": f"LOW-REGRET: LoRA rank {plan.rank} should match full fine-tuning",
                "borderline": f"BORDERLINE: LoRA rank {plan.rank} may fall short of full fine-tuning",
                }.get(c.verdict, f"{c.verdict.upper()}: LoRA rank {plan.rank} is expected to fall behind full "
                                 "fine-tuning")
    return c.verdict, headline, f"The {measure} (low-regret >= {c.low_regret_ratio:g}x); {smallest}.{_needs(plan)}"


def _needs(plan: CapacityPlan) -> str:
    """' LoRA needs 1 x H100-80GB-SXM (micro-batch 2, 54.3 GB per GPU).', or '' when it fits nowhere."""
    fit = next((f for f in plan.hardware if f.method == "lora" and f.num_gpus), None)
    if fit is None:
        return ""
    return (f" LoRA needs {fit.num_gpus} x {fit.gpu} (micro-batch {fit.micro_batch}, grad accum {fit.grad_accum_steps}"
            f"{', gradient checkpointing' if fit.gradient_checkpointing else ''}; {gb(fit.total_bytes)} per GPU).")


def chart_titles(plan: CapacityPlan) -> dict[str, str]:
    """Chart file -> title naming the model, the data and the verdict."""
    level = verdict(plan)[0]
    head = (f"{plan.model['name']} on {data_name(plan)}: {level.upper()}" if level != "none"
            else f"{plan.model['name']}, no dataset (no capacity verdict)")
    return {
        "capacity.png": f"{head}\nLoRA capacity over ranks 1-512 vs the data's information",
        "memory.png": f"{head}\nmemory per GPU at each method's recommended micro-batch, "
                      f"{plan.settings['memory_seq_len']:,} tokens per row",
    }


def _value(value) -> str:
    """A constant's value for people: numbers plainly, dicts as 'key value' lists, not Python reprs."""
    if isinstance(value, dict):
        def item(k, v):
            name = k.removesuffix("_bytes_per_param").replace("_", " ")
            return f"{name} ({_value(v)})" if isinstance(v, dict) else f"{name} {_value(v)}"

        return ", ".join(item(k, v) for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _model_section(plan: CapacityPlan) -> Section:
    m, lora = plan.model, plan.lora
    facts = [("model", f"{m['name']} ({m['model_type']})"), ("parameters", f"{m['total_params']:,}")]
    if m["num_experts"]:
        facts.append(("active parameters per token", f"{m['active_params']:,}"))
        facts.append(("expert rank", f"{lora.expert_rank} = max(1, {plan.rank} // {lora.divisor_value}) "
                                     f"(divisor '{plan.expert_rank_divisor}')"))
    facts += [("LoRA rank", str(plan.rank)), ("targets", plan.targets),
              ("adapter parameters", f"{plan.adapter_params:,}")]
    facts += [(f"  of which {role}", f"{n:,}") for role, n in lora.by_role.items()]
    matrices = Table(("matrix", "role", "d_in", "d_out", "copies", "rank", "adapter params"),
                     tuple((x.name, x.role, f"{x.d_in:,}", f"{x.d_out:,}", f"{x.count:,}", str(x.rank), f"{x.params:,}")
                           for x in lora.matrices), numeric=(2, 3, 4, 5, 6))
    return Section("model", "Model and adapter", (Table(("", ""), tuple(facts)), "Adapter by matrix:", matrices))


def _data_section(plan: CapacityPlan) -> Section:
    d = plan.dataset
    if d is None:
        return Section("data", "Data and lengths", ("No dataset given: pass --dataset for token counts, the "
                                                     "information in the data and a capacity verdict.",))
    sampled = "" if d["sampled_examples"] in (None, 0, d["examples"]) else f" ({d['sampled_examples']:,} sampled)"
    facts = [("source", d["source"]), ("format", d["format"]), ("examples", f"{d['examples']:,}{sampled}")]
    if d["total_tokens"] is not None:
        facts += [("tokens", f"{d['total_tokens']:,}"), ("completion tokens (trained)", f"{d['completion_tokens']:,}")]
    facts.append(("information", f"{d['information_bits']:,.0f} bits ({d['information_method']})"))
    if d.get("bits_per_completion_token") is not None:
        facts.append(("bits per completion token", f"{d['bits_per_completion_token']:.3g}"))
    if d["tokenizer"]:
        facts.append(("tokenizer", d["tokenizer"]))
    blocks: list = [Table(("", ""), tuple(facts))]
    n = plan.lengths
    if n is not None:
        blocks.append(f"Token lengths of {n.examples:,} examples (prompt + completion):")
        blocks.append(Table(
            ("p50", "p95", "p99", "max", "max_length", "truncated at max_length", "suggested max_length",
             "truncated at suggested", "memory sized at"),
            ((f"{n.p50_tokens:,}", f"{n.p95_tokens:,}", f"{n.p99_tokens:,}", f"{n.max_tokens:,}",
              f"{n.max_length:,}", f"{n.truncated_share:.1%}", f"{n.suggested_max_length:,}",
              f"{n.suggested_truncated_share:.1%}",
              f"{n.memory_seq_len:,} tokens per row ({'packed' if n.packing else 'padded to the longest'})"),),
            numeric=tuple(range(8))))
    return Section("data", "Data and lengths", tuple(blocks))


def _capacity_section(plan: CapacityPlan, title: str) -> Section:
    c = plan.capacity
    blocks: list = [Figure("capacity.png", title.replace("\n", ": "))]
    if c is not None:
        ratio = "unbounded" if c.capacity_over_data is None else f"{c.capacity_over_data:,.2f}x"
        facts = [("adapter capacity", f"{c.capacity_bits:,.0f} bits ({c.bits_per_param:g} bits per parameter)"),
                 ("data information", f"{c.dataset_bits:,.0f} bits ({c.information_method})"),
                 ("capacity / data", f"{ratio} -> {c.verdict} (low-regret >= {c.low_regret_ratio:g}x, "
                                     f"borderline >= {c.borderline_ratio:g}x)"),
                 ("smallest low-regret rank", f"{c.min_rank_pow2 or 'none <= 512'} (power of two), "
                                              f"{c.min_rank_exact or 'none'} (exact)")]
        if c.completion_tokens is not None:
            facts.append(("Tinker's rule: adapter params >= completion tokens",
                          f"{'holds' if c.tinker_rule_holds else 'fails'} ({plan.adapter_params:,} vs "
                          f"{c.completion_tokens:,}); smallest rank {c.tinker_min_rank_pow2 or '-'}"))
        blocks.append(Table(("", ""), tuple(facts)))
    return Section("capacity", "Capacity", tuple(blocks))


def _memory_section(plan: CapacityPlan, title: str) -> Section:
    s = plan.settings
    fits = []
    for f in plan.hardware:
        if f.num_gpus is None:
            fits.append((f.method, f"does not fit on {s['num_gpus'] or 'up to 1024'}", "-", "-", "-", "-", "-", "-"))
            continue
        wall = duration(wall_hours(plan, f) * 3600) if plan.run else "-"
        fits.append((f.method, f"{f.num_gpus}", f"{f.micro_batch}", f"{f.grad_accum_steps}",
                     "yes" if f.gradient_checkpointing else "no", f"{f.effective_batch}", gb(f.total_bytes), wall))
    fit_table = Table(("method", "GPUs", "micro-batch", "grad accum", "gradient checkpointing", "effective batch",
                       "GB per GPU", "run wall time"), tuple(fits), numeric=(1, 2, 3, 5, 6))
    parts = Table(("method", "GPUs", "micro-batch", "weights", "grads", "optimizer", "activations", "temporaries",
                   "overhead", "total", "fits"),
                  tuple((m.method, str(m.num_gpus), str(m.micro_batch)) + tuple(gb(getattr(m, p)) for p in _MEMORY_PARTS)
                        + (gb(m.total_bytes), "yes" if m.total_bytes <= _gpu_bytes(plan) else "no")
                        for m in plan.memory), numeric=tuple(range(1, 10)))
    blocks: list = [
        f"The fewest {s['gpu']} GPUs each method fits on (FSDP2 sharding, {s['memory_seq_len']:,} tokens per "
        f"row, batch {s['batch_size']} sequences):",
        fit_table,
        Figure("memory.png", title.replace("\n", ": ")),
        "Per GPU at 1, 2, 4, 8 GPUs and the recommended count, at the recommended micro-batch (capped by the batch "
        "share of each GPU), in the step's peak phase:",
        parts,
    ]
    if plan.measured:
        blocks += ["Measured peak per GPU (the trainer's own step on fake tensors; allocated bytes):",
                   tuple(measured_line(row).strip() for row in plan.measured)]
    return Section("memory", "Memory per method", tuple(blocks))


def _gpu_bytes(plan: CapacityPlan) -> float:
    return get_gpu(plan.settings["gpu"]).memory_bytes


def _compute_section(plan: CapacityPlan) -> Section:
    f = plan.flops
    rows = [("FullFT", _num(f.fullft_flops_per_token), "1.000"),
            ("LoRA", _num(f.lora_flops_per_token), f"{f.lora_over_fullft:.3f}")]
    blocks: list = [f"Training FLOPs per token at sequence length {f.seq_len:,} (attention scores "
                    f"{_num(f.attention_scores_flops_per_token)} of them):",
                    Table(("method", "FLOPs per token", "vs FullFT"), tuple(rows), numeric=(1, 2))]
    r = plan.run
    if r is not None:
        blocks.append(f"The run: {r.tokens:,} tokens on {r.num_gpus} x {r.gpu} at MFU {r.mfu:g} (assumed):")
        blocks.append(Table(("method", "FLOPs", "GPU-hours", "wall time"),
                            (("FullFT", _num(r.fullft_flops), f"{r.fullft_gpu_hours:.3g}", duration(r.fullft_seconds)),
                             ("LoRA", _num(r.lora_flops), f"{r.lora_gpu_hours:.3g}", duration(r.lora_seconds))),
                            numeric=(1, 2)))
    return Section("compute", "FLOPs and time", tuple(blocks))


def _assumptions_section(plan: CapacityPlan) -> Section:
    notes = tuple(plan.notes) + tuple(f"Data: {n}" for n in (plan.dataset or {}).get("notes", ()))
    constants = Table(("constant", "value", "source"),
                      tuple((c["name"], _value(c["value"]), c["source"]) for c in plan.constants))
    return Section("assumptions", "Assumptions and sources", (notes, constants))


def report_sections(plan: CapacityPlan) -> tuple[Section, ...]:
    """The report's sections, in order; the Markdown and the HTML page both render these."""
    titles = chart_titles(plan)
    return (
        _model_section(plan),
        _data_section(plan),
        _capacity_section(plan, titles["capacity.png"]),
        _memory_section(plan, titles["memory.png"]),
        _compute_section(plan),
        Section("advice", "Advice", (tuple(plan.advice.messages),)),
        _assumptions_section(plan),
    )


def _cells(row) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"


def render_markdown(plan: CapacityPlan) -> str:
    """plan.md: the banner as a quote, then every section; charts link the PNGs beside it."""
    level, headline, explanation = verdict(plan)
    lines = [f"# Capacity plan: {plan.model['name']}, LoRA rank {plan.rank}, {data_name(plan)}", "",
             f"> **{headline}**", ">", f"> {explanation}", ""]
    for section in report_sections(plan):
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines += [_cells(block.header),
                          _cells("---:" if i in block.numeric else "---" for i in range(len(block.header)))]
                lines += [_cells(row) for row in block.rows]
            elif isinstance(block, Figure):
                lines.append(f"![{block.caption}]({block.name})")
            elif isinstance(block, tuple):
                lines += [f"- {item}" for item in block]
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:24px auto;padding:0 16px;
color:#222;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.3em}h2{margin-top:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}
nav a{margin-right:1em}
.banner{border-radius:8px;padding:14px 18px;margin:16px 0;border:2px solid}
.banner strong{font-size:1.35em;display:block;margin-bottom:.3em}
.low-regret{background:#e8f5e9;border-color:#2e7d32}.borderline{background:#fff8e1;border-color:#f9a825}
.capacity-constrained{background:#ffebee;border-color:#c62828}.none{background:#f0f0f0;border-color:#888}
table{border-collapse:collapse;font-size:13px;margin:8px 0 14px}td,th{border:1px solid #ccc;padding:3px 8px;
vertical-align:top}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:10px 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:12px;color:#555}
.footer{font-size:12px;color:#666;margin-top:2em}
"""


def render_html(plan: CapacityPlan, charts: dict[str, bytes]) -> str:
    """One self-contained page (styles inline, charts as data: URIs): banner, sections, sources."""
    esc = html.escape
    images = {name: "data:image/png;base64," + base64.b64encode(data).decode() for name, data in charts.items()}
    level, headline, explanation = verdict(plan)
    sections = report_sections(plan)
    out = [f"<h1>Capacity plan: {esc(plan.model['name'])}, LoRA rank {plan.rank}, {esc(data_name(plan))}</h1>",
           f'<div class="banner {esc(level)}" id="verdict"><strong>{esc(headline)}</strong>{esc(explanation)}</div>',
           "<nav>" + "".join(f'<a href="#{s.anchor}">{esc(s.title)}</a>' for s in sections) + "</nav>"]
    for section in sections:
        out.append(f'<section id="{section.anchor}"><h2>{esc(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, Table):
                head = "".join(f"<th>{esc(c)}</th>" for c in block.header) if any(block.header) else ""
                body = "".join(
                    "<tr>" + "".join(f'<td{" class=num" if i in block.numeric else ""}>{esc(c)}</td>'
                                     for i, c in enumerate(row)) + "</tr>" for row in block.rows)
                out.append(f"<table>{'<tr>' + head + '</tr>' if head else ''}{body}</table>")
            elif isinstance(block, Figure):
                out.append(f'<figure><img alt="{esc(block.caption)}" src="{images[block.name]}">'
                           f"<figcaption>{esc(block.caption)}</figcaption></figure>")
            elif isinstance(block, tuple):
                out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block) + "</ul>")
            else:
                out.append(f"<p>{esc(block)}</p>")
        out.append("</section>")
    out.append('<p class="footer">Written by <code>lowregret plan</code>; every number is in plan.json beside this '
               "page. Formulas and sources: docs/PLANNER.md.</p>")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>Capacity plan: {esc(plan.model['name'])} ({esc(level)})</title><style>{_CSS}</style></head>"
            "<body>" + "\n".join(out) + "</body></html>\n")


def write_report(plan: CapacityPlan, out_dir: str | Path) -> dict[str, Path]:
    """Write plan.json, plan.md, plan.html and the chart PNGs into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the report is meant to be shared
    try:
        (tmp / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        titles = chart_titles(plan)
        capacity_chart(plan, titles["capacity.png"], tmp / "capacity.png")
        memory_chart(plan, titles["memory.png"], tmp / "memory.png")
        (tmp / "plan.md").write_text(render_markdown(plan))
        charts = {name: (tmp / name).read_bytes() for name in CHARTS}
        (tmp / "plan.html").write_text(render_html(plan, charts))
        names = sorted(p.name for p in tmp.iterdir())
        try:
            os.replace(tmp, out)  # a new report folder appears complete
        except OSError:  # it exists (maybe just made by another process writing the same report):
            for name in names:  # keep the user's other files; each of ours replaces its old version
                os.replace(tmp / name, out / name)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {name: out / name for name in names}
