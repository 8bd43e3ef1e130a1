"""Charts of the capacity plan, and the chart conventions every LowRegret chart shares.

One colour per training method everywhere (plan, `compare`, pipeline and sweep charts), log axes
with plain tick labels (1, 2, 5, 10, not 2×10⁰), and titles that name the model, the data and the
verdict. matplotlib (Agg) is imported only inside the drawing functions, so importing this module
stays light and torch-free.
"""

from __future__ import annotations

from pathlib import Path

# Method -> colour (matplotlib's tab10 hues). FullFT blue, LoRA orange in every chart; the planner's
# pure-bf16 FullFT a lighter blue, QLoRA purple.
METHOD_COLOURS = {"full": "#1f77b4", "full_bf16": "#7fb8e0", "lora": "#ff7f0e", "qlora": "#9467bd"}
METHOD_LABELS = {"full": "FullFT", "full_bf16": "FullFT pure bf16", "lora": "LoRA", "qlora": "QLoRA"}
# Runs of one method in one chart (a sweep) keep the method's colour and differ by line style.
LINE_STYLES = ("-", "--", ":", "-.")
OTHER_COLOUR = "#7f7f7f"


def si_number(x: float) -> str:
    """1234567 -> '1.23M' (k, M, B, T, P; three significant digits)."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def method_colour(method: str | None) -> str:
    return METHOD_COLOURS.get(method or "", OTHER_COLOUR)


def plain_log_axis(axis, formatter=None) -> None:
    """Log-axis ticks at 1, 2, 5 × 10^k labelled as plain numbers (`formatter(value)` if given)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: formatter(v) if formatter else f"{v:,.10g}"))
    axis.set_minor_formatter(NullFormatter())


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_chart(fig, ax, title: str, path: Path, *, grid_axis: str = "both", legend_loc: str = "best",
                 dpi: int = 110) -> None:
    """The shared finish of every chart: title, major grid, legend, tight layout, PNG, figure closed.
    The PNG is written beside and renamed: a reader (or a pipeline drawing the same chart) never sees
    half a file."""
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", axis=grid_axis, alpha=0.3)
    ax.legend(fontsize=8, loc=legend_loc)
    save_figure(fig, path, dpi=dpi)


def save_figure(fig, path: Path, *, dpi: int = 110) -> None:
    """Tight layout, PNG written beside and renamed (no reader sees half a file), figure closed."""
    from data.atomic import replacing

    fig.tight_layout()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        pyplot().close(fig)


def capacity_chart(plan, title: str, path: Path) -> None:
    """Adapter capacity (bits) over ranks 1..512 against the dataset's bits and the low-regret line."""
    plt = pyplot()
    bits = plan.settings["bits_per_param"]
    ranks = [r for r, _ in plan.rank_curve]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(ranks, [p * bits for _, p in plan.rank_curve], "o-", color=METHOD_COLOURS["lora"],
            label=f"LoRA adapter capacity ({bits:g} bits/param)")
    c = plan.capacity
    if c is not None and c.dataset_bits > 0:
        ax.axhline(c.dataset_bits, color="black", label=f"dataset information ({c.information_method})")
        ax.axhline(c.low_regret_ratio * c.dataset_bits, color="black", ls="--",
                   label=f"low-regret threshold ({c.low_regret_ratio:g}x the data)")
    ax.axvline(plan.rank, color="grey", ls=":", label=f"planned rank {plan.rank}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis, si_number)
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("bits")
    finish_chart(fig, ax, title, path)


def memory_chart(plan, title: str, path: Path) -> None:
    """GB per GPU of each method (one colour each) at 1, 2, 4, 8 GPUs and the method's recommended
    micro-batch (`plan.memory`; capped by the batch's share of each GPU), against the GPU's memory;
    the recommended GPU count is starred."""
    from planner.gpus import get_gpu

    plt = pyplot()
    methods = list(dict.fromkeys(m.method for m in plan.memory))
    counts = sorted({m.num_gpus for m in plan.memory})
    fits = {f.method: f for f in plan.hardware}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    starred = False
    for i, method in enumerate(methods):
        rows = {m.num_gpus: m for m in plan.memory if m.method == method}
        xs = [counts.index(n) + (i - (len(methods) - 1) / 2) * width for n in rows]
        values = [m.total_bytes / 1e9 for m in rows.values()]
        fit = fits.get(method)
        if fit is not None and fit.num_gpus:
            label = (f"{METHOD_LABELS.get(method, method)}: micro-batch {fit.micro_batch}"
                     f"{', checkpointing' if fit.gradient_checkpointing else ''}")
        else:
            label = f"{METHOD_LABELS.get(method, method)}: fits nowhere (micro-batch 1, checkpointing)"
        ax.bar(xs, values, width=width, color=method_colour(method), label=label)
        if fit is not None and fit.num_gpus in rows:
            x = xs[list(rows).index(fit.num_gpus)]
            ax.plot([x], [rows[fit.num_gpus].total_bytes / 1e9], marker="*", markersize=13, color="black",
                    linestyle="none", label=None if starred else "recommended: the fewest GPUs that fit")
            starred = True
    gpu = get_gpu(plan.settings["gpu"])
    ax.axhline(gpu.memory_bytes / 1e9, color="black", ls="--", label=f"{gpu.name} memory")
    ax.set_xticks(range(len(counts)), [f"{n} GPU" + ("s" if n > 1 else "") for n in counts])
    totals = [m.total_bytes for m in plan.memory]
    if max(totals) > 20 * min(totals):  # huge models: the bars near the GPU's line would be flat on a linear axis
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
    ax.set_ylabel("GB per GPU (FSDP-sharded)" + (", log scale" if ax.get_yscale() == "log" else ""))
    finish_chart(fig, ax, title, path, grid_axis="y", legend_loc="upper right")
