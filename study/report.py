"""The study's results in a few terminal lines (what `lowregret study` prints at the end)."""

from __future__ import annotations


def _g(value, spec: str = ".3g", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def summary_lines(results: dict) -> list[str]:
    lines = [f"Study ({results['scale']}): {results['cells']} runs"
             + (f", {results['wall_s']:.0f} s wall" if "wall_s" in results else "")
             + (f", load average {results['load_average_end'][0]:.1f} at the end" if "load_average_end" in results else "")]
    knee = results.get("knee") or {}
    if knee.get("sizes"):
        first = knee["sizes"][0]
        lines.append(f"Capacity knee (facts model; LoRA LR {first['lora_lr']:g}, FullFT LR {first['full']['lr']:g}):")
        lines.append(f"  {'facts':>6} {'info bits':>10} {'FullFT stored':>14} {'knee (90% FullFT)':>19} "
                     f"{'planner @2 bits/param':>22} {'within 2x':>10}")
        for s in knee["sizes"]:
            lines.append(f"  {s['n_facts']:>6} {s['information_bits']:>10,.0f} {s['full']['bits']['stored_bits']:>14,.0f} "
                         f"{_g(s['measured_min_rank'], 'd', '> grid'):>19} {_g(s['predicted']['min_rank_pow2'], 'd'):>22} "
                         f"{_g(s['within_2x'], '', '-'):>10}")
        spiked = [f"{s['n_facts']} facts " + ", ".join(f"r{r['rank']}" for r in s["ranks"] if r.get("unstable"))
                  for s in knee["sizes"] if any(r.get("unstable") for r in s["ranks"])]
        if spiked:
            lines.append("  unstable (training loss rose above its start; the knee cannot be read there): "
                         + "; ".join(spiked))
        fit = knee.get("fit")
        if fit:
            interval = fit.get("interval")
            from study.capacity import short_of_fullft

            shortfalls = short_of_fullft(fit["bits_per_param"], fit["runs"])
            lines.append(f"Bits per adapter parameter: {fit['bits_per_param']:.3g}"
                         + (f" (leave one size out: {interval[0]:.3g}-{interval[1]:.3g})" if interval else "")
                         + f"; {len(fit['saturated'])} capacity-bound runs; prior 2"
                         + (f"; a lower bound only: {len(shortfalls)} runs with room to spare stored under 90% of "
                            "FullFT's bits (optimisation-bound)" if shortfalls else ""))
        else:
            lines.append("Bits per adapter parameter: not measurable (no LoRA run was capacity-bound)")
    lr = results.get("lr") or {}
    for name, corpus in lr.get("corpora", {}).items():
        optima = ", ".join(f"{'FullFT' if g['method'] == 'full' else 'r' + str(g['rank'])} "
                           f"{_g(g['optimum_lr'])}{'' if g['status'] == 'ok' else ' [' + g['status'] + ']'}"
                           for g in corpus["fit"]["groups"])
        ratios = ", ".join(f"r{r['rank']} {r['ratio']:.1f}x" for r in corpus["fit"]["lr_ratios"]) or "none"
        early = corpus.get("early_curves") or {}
        lines.append(f"LR {name} ({results.get('lr_steps')} steps): optima {optima}; LoRA/FullFT {ratios}; "
                     f"optimum max/min over ranks {_g(corpus['optimum_max_over_min'])}"
                     + (f"; early curves spread {early['max_early_spread']:.3f} of a {early['loss_drop']:.3f} drop"
                        if early else ""))
    if lr.get("ratio_geometric_mean"):
        lines.append(f"LoRA/FullFT LR ratio (geometric mean): {lr['ratio_geometric_mean']:.2f} (prior 10; 15 for short runs)")
    for model, rows in (results.get("layers") or {}).items():
        if rows:
            lines.append(f"Layers ({model}): " + "; ".join(
                f"{r['targets']} r={r['rank']} ({r['adapter_params']:,} params) regret {_g(r.get('regret_nats'), '+.4f')}"
                for r in rows))
    noise = results.get("noise") or {}
    if noise.get("seeds"):
        lines.append(f"Noise: regret over {len(noise['seeds'])} seeds mean {noise['regret_mean']:+.4f}, "
                     f"sd {_g(noise['regret_sd'], '.4f')} nats/token; FullFT loss sd {_g(noise['full_loss_sd'], '.4f')}")
    for row in (results.get("batch") or {}).get("batches", []):
        lines.append(f"Batch {row['batch']}: stored bits LoRA {row['lora']['stored_bits']:,.0f}, FullFT "
                     f"{row['full']['stored_bits']:,.0f}; regret {row['regret_nats']:+.4f} nats/token"
                     + "".join(f"; {who} unstable" for who in ("lora", "full") if row.get(f"{who}_unstable")))
    if results.get("charts"):
        lines.append(f"Charts: {', '.join(results['charts'])}")
    if results.get("calibration"):
        lines.append(f"Calibration: {results['calibration']}")
    return lines
