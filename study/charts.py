"""The study's charts (PNG), drawn from results.json alone so they can be redrawn without the runs.

One function per chart; `draw_all(results, out_dir)` writes the ones the results hold data for and
returns their paths. matplotlib is imported inside (Agg backend, no display needed).
"""

from __future__ import annotations

from pathlib import Path

from planner.report_charts import pyplot as _plt
from planner.report_charts import save_figure


def knee_chart(results: dict, path: Path) -> Path | None:
    """Left: bits stored (and absorbed) against rank per dataset size, FullFT dashed, the data's
    information dotted. Right: the gate's regret with its 95% interval against rank, the allowed
    regret shaded; the planner's predicted rank (dash-dot) and the measured knee (star) on both."""
    sizes = (results.get("knee") or {}).get("sizes") or []
    if not sizes:
        return None
    plt = _plt()
    fig, (bits_ax, regret_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, size in enumerate(sizes):
        color = f"C{i}"
        rows = size["ranks"]
        ranks = [r["rank"] for r in rows]
        bits_ax.plot(ranks, [r["bits"]["stored_bits"] for r in rows], "o-", color=color,
                     label=f"LoRA stored, {size['n_facts']} facts")
        bits_ax.plot(ranks, [r["bits"]["absorbed_bits"] for r in rows], "^:", color=color, mfc="none",
                     label=f"LoRA absorbed (base − final), {size['n_facts']} facts")
        bits_ax.axhline(size["full"]["bits"]["stored_bits"], color=color, ls="--", lw=1)
        bits_ax.axhline(size["information_bits"], color=color, ls=":", lw=1)
        regret = [r["regret_nats"] for r in rows]
        regret_ax.errorbar(ranks, regret, yerr=[[g - r["regret_low"] for g, r in zip(regret, rows, strict=True)],
                                                [r["regret_high"] - g for g, r in zip(regret, rows, strict=True)]],
                           fmt="o-", color=color, capsize=3, label=f"{size['n_facts']} facts")
        regret_ax.axhline(rows[0]["allowed_nats"], color=color, ls=":", lw=1)
        for ax in (bits_ax, regret_ax):
            if size["predicted"]["min_rank_pow2"]:
                ax.axvline(size["predicted"]["min_rank_pow2"], color=color, ls="-.", lw=1, alpha=0.6)
        measured = size["measured_min_rank"]
        if measured:
            row = next(r for r in rows if r["rank"] == measured)
            bits_ax.plot([measured], [row["bits"]["stored_bits"]], "*", ms=16, color=color, mec="k")
            regret_ax.plot([measured], [row["regret_nats"]], "*", ms=16, color=color, mec="k")
    for ax in (bits_ax, regret_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank (all layers)")
    bits_ax.set_ylabel("bits (stored: a lower bound on what it knows)")
    bits_ax.set_title("Bits per run: FullFT stored (dashed), data's information (dotted),\n"
                      "planner's rank at 2 bits/param (dash-dot), knee: stores >= 90% of FullFT's (star)", fontsize=9)
    bits_ax.legend(fontsize=7)
    regret_ax.set_ylabel("regret vs FullFT (nats/token), 95% interval")
    regret_ax.set_title("The gate: LoRA − FullFT held-out loss; allowed regret (dotted)", fontsize=9)
    regret_ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def bits_per_param_chart(results: dict, path: Path) -> Path | None:
    """Bits stored against adapter parameters (log-log) with the fitted min(b·P, FullFT) model."""
    knee = results.get("knee") or {}
    fit = knee.get("fit")
    sizes = knee.get("sizes") or []
    if not sizes:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    all_params = [r["adapter_params"] for s in sizes for r in s["ranks"]]
    lo, hi = min(all_params) / 1.5, max(all_params) * 1.5
    zero = 0
    for i, size in enumerate(sizes):
        stored = [(r["adapter_params"], r["bits"]["stored_bits"]) for r in size["ranks"] if r["bits"]["stored_bits"] > 0]
        zero += len(size["ranks"]) - len(stored)
        ax.plot([p for p, _ in stored], [b for _, b in stored], "o", color=f"C{i}", label=f"stored, {size['n_facts']} facts")
        ax.plot([r["adapter_params"] for r in size["ranks"]], [r["bits"]["absorbed_bits"] for r in size["ranks"]], "^",
                color=f"C{i}", mfc="none", label=f"absorbed (base − final), {size['n_facts']} facts")
        if fit:
            full = size["full"]["bits"]["stored_bits"]
            xs = [lo * (hi / lo) ** (k / 60) for k in range(61)]
            ax.plot(xs, [min(fit["bits_per_param"] * x, full) for x in xs], "-", color=f"C{i}", lw=1, alpha=0.7)
    xs = [lo, hi]
    ax.plot(xs, [2 * x for x in xs], "k:", lw=1, label="2 bits/param (prior)")
    if fit:
        from study.capacity import short_of_fullft

        short = short_of_fullft(fit["bits_per_param"], fit["runs"])
        bound = " (a lower bound: runs with room to spare fell short)" if short else ""
        ax.plot(xs, [fit["bits_per_param"] * x for x in xs], "k--", lw=1,
                label=f"fit: {fit['bits_per_param']:.2g} bits/param{bound}")
    if zero:  # a log axis has no 0: say so instead of drawing those runs at some floor
        ax.text(0.98, 0.03, f"{zero} LoRA run(s) stored 0 bits (not drawn): no b from them", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel("bits about the facts")
    ax.set_title("Bits per adapter parameter: stored = min(b · params, FullFT's)", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def lr_chart(results: dict, corpus: str, path: Path) -> Path | None:
    """Final held-out loss against LR per method/rank, with each fitted optimum."""
    entry = (results.get("lr") or {}).get("corpora", {}).get(corpus)
    if not entry:
        return None
    import math

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for i, group in enumerate(entry["fit"]["groups"]):
        label = "FullFT" if group["method"] == "full" else f"LoRA r={group['rank']}"
        lrs, losses = zip(*entry["loss_by_lr"][label], strict=True)
        color = "k" if group["method"] == "full" else f"C{i}"
        ax.plot(lrs, losses, "o-" if group["method"] == "lora" else "s--", color=color, label=label)
        if group["coefficients"] and group["status"] == "ok":
            a, b, c = group["coefficients"]
            xs = [math.log10(min(lrs)) + k * (math.log10(max(lrs)) - math.log10(min(lrs))) / 40 for k in range(41)]
            ax.plot([10**x for x in xs], [a * x * x + b * x + c for x in xs], "-", color=color, lw=0.8, alpha=0.5)
            ax.plot([group["optimum_lr"]], [group["optimum_loss"]], "v", color=color, ms=9)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (constant)")
    ax.set_ylabel("final held-out loss (nats/token)")
    ratios = ", ".join(f"r={r['rank']}: {r['ratio']:.1f}×" for r in entry["fit"]["lr_ratios"])
    ax.set_title(f"LR sweep on {corpus} (fitted optimum ▼)\nLoRA/FullFT optimum ratio: {ratios or 'n/a'}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def early_curves_chart(results: dict, path: Path) -> Path | None:
    """Training loss per step of every rank at one LR, per corpus."""
    corpora = [(name, e["early_curves"]) for name, e in (results.get("lr") or {}).get("corpora", {}).items()
               if e.get("early_curves")]
    if not corpora:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.2), squeeze=False)
    for ax, (name, early) in zip(axes[0], corpora, strict=True):
        steps = sorted(int(s) for s in early["loss_by_step"])
        for i, rank in enumerate(early["ranks"]):
            ax.plot(steps, [early["loss_by_step"][str(s)][str(rank)] for s in steps], "-", color=f"C{i}",
                    label=f"r={rank}")
        ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/token)")
        ax.set_title(f"{name}: LoRA ranks at LR {early['lr']:g}\nmax spread over the first steps "
                     f"{early['max_early_spread']:.3f} nats (loss drop {early['loss_drop']:.3f})", fontsize=9)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def layers_chart(results: dict, path: Path) -> Path | None:
    """Regret against FullFT of attention-only / MLP-only / all at matched parameter counts."""
    layers = results.get("layers") or {}
    panels = [(m, rows) for m, rows in layers.items() if rows and all("regret_nats" in r for r in rows)]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    titles = {"facts": "facts model (memorisation)", "lr": "LR model, first corpus"}
    for ax, (model, rows) in zip(axes[0], panels, strict=True):
        names = [f"{r['targets']}\nr={r['rank']}, {r['adapter_params']:,} params" for r in rows]
        colors = {"all": "C0", "mlp": "C1", "attention": "C2"}
        errors = None
        if all(r.get("regret_low") is not None for r in rows):
            errors = [[r["regret_nats"] - r["regret_low"] for r in rows], [r["regret_high"] - r["regret_nats"] for r in rows]]
        ax.bar(names, [r["regret_nats"] for r in rows], yerr=errors, capsize=4,
               color=[colors.get(r["targets"], "C3") for r in rows])
        ax.axhline(0, color="k", lw=0.8)
        if rows:
            ax.axhline(rows[0]["allowed_nats"], color="k", ls=":", lw=1, label="allowed regret")
        ax.set_ylabel("regret vs FullFT (nats/token)")
        ax.set_title(f"Layers at matched parameters: {titles.get(model, model)}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def noise_chart(results: dict, path: Path) -> Path | None:
    """Regret per seed with its mean and ±1 sd band."""
    noise = results.get("noise") or {}
    rows = noise.get("seeds") or []
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    seeds = [r["seed"] for r in rows]
    ax.plot(seeds, [r["regret_nats"] for r in rows], "o", ms=9, label="regret (LoRA − FullFT)")
    mean, sd = noise["regret_mean"], noise.get("regret_sd")
    ax.axhline(mean, color="C0", lw=1)
    if sd is not None:
        ax.axhspan(mean - sd, mean + sd, color="C0", alpha=0.15, label=f"±1 sd = {sd:.4f} nats")
    ax.axhline(rows[0]["allowed_nats"], color="k", ls=":", lw=1, label="gate's allowed regret")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(seeds)
    ax.set_xlabel("seed (data order, LoRA init)")
    ax.set_ylabel("nats/token")
    ax.set_title("Seed spread of the regret (one configuration)", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def batch_chart(results: dict, path: Path) -> Path | None:
    """Bits stored by LoRA and FullFT at each batch size."""
    rows = (results.get("batch") or {}).get("batches") or []
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["full"]["stored_bits"] for r in rows], 0.4, label="FullFT")
    ax.bar([x + 0.2 for x in xs], [r["lora"]["stored_bits"] for r in rows], 0.4, label="LoRA")
    ax.axhline(rows[0]["lora"]["information_bits"], color="k", ls=":", lw=1, label="information in the data")
    ax.set_xticks(list(xs), [f"batch {r['batch']}\n{r['steps']} steps" for r in rows])
    ax.set_ylabel("bits stored about the facts")
    ax.set_title("Batch size: LoRA vs FullFT at the same passes over the data", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def draw_all(results: dict, out_dir: str | Path) -> list[str]:
    """Every chart the results have data for, as PNGs in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn = [knee_chart(results, out / "knee.png"), bits_per_param_chart(results, out / "bits_per_param.png")]
    for corpus in (results.get("lr") or {}).get("corpora", {}):
        drawn.append(lr_chart(results, corpus, out / f"lr_{corpus}.png"))
    drawn += [early_curves_chart(results, out / "early_curves.png"), layers_chart(results, out / "layers.png"),
              noise_chart(results, out / "noise.png"), batch_chart(results, out / "batch.png")]
    return [str(p) for p in drawn if p is not None]
