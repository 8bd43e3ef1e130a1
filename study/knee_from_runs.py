"""The knee table from the knee's run folders alone, without the rest of the study.

`lowregret study` trains every experiment before it analyses any; the knee's runs are also cells of
`lowregret sweep --config <knee part>.yaml` (study.design.knee_parts), so they can be trained alone
(or by `lowregret train` with a cell's config into runs/<part>/train/<label>) and tabulated
here with the study's own analysis (`study.analysis.knee_table`: stored bits on the
facts' values, the measured knee, the planner's prediction under the prior, the bits/param fit).
docs/STUDY.md's table of the knee at LoRA LR 0.01 (section 1, docs/study/knee_lr0.01.json) came from

    python -m study.knee_from_runs --workdir W --lora-lr 0.01 --full-lr 0.01 --out docs/study/knee_lr0.01.json

Pure reading: nothing is trained; the base model is the one the runs name in their config.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from study.analysis import Cell, knee_table

_KNEE_DIR = re.compile(r"^study-(?P<scale>\w+)-knee-n(?P<n>\d+)$")


def knee_cells(runs_dir: Path, scale: str, lora_lr: float, full_lr: float) -> list[Cell]:
    """The finished all-layer knee runs of `scale` at the two LRs, one Cell each: the sweep's cells
    (runs/<part>/sweep/<label>-<run key>, the key the study's results name) and the same configs
    trained by `lowregret train` into runs/<part>/train/<label> (no run key: the trainer's config hash)."""
    cells = []
    for summary in sorted(runs_dir.glob(f"study-{scale}-knee-n*/*/*/summary.json")):
        match = _KNEE_DIR.match(summary.parents[2].name)
        run = json.loads(summary.read_text())
        config = run["config"]
        if match is None or config.get("targets", "all") != "all":
            continue
        method, lr = config["method"], float(config["lr"])
        if lr != (lora_lr if method == "lora" else full_lr):
            continue
        rank = int(config["rank"]) if method == "lora" else None
        cells.append(Cell("knee", summary.parents[2].name, {"n_facts": int(match["n"])}, method, rank, lr,
                          summary.parent.name, summary.parent.name.rsplit("-", 1)[-1]
                          if summary.parents[1].name == "sweep" else run["config_hash"], str(summary.parent)))
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.knee_from_runs", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=".", help="where runs/ is (the sweep's --workdir)")
    parser.add_argument("--scale", default="full")
    parser.add_argument("--lora-lr", type=float, required=True)
    parser.add_argument("--full-lr", type=float, required=True)
    parser.add_argument("--out", help="also write the table as JSON here")
    parser.add_argument("--charts", help="also draw the study's knee and bits/param charts into this folder "
                        "(knee.png, bits_per_param.png)")
    args = parser.parse_args(argv)
    from study.design import SCALES

    cells = knee_cells(Path(args.workdir) / "runs", args.scale, args.lora_lr, args.full_lr)
    sizes = {c.tags["n_facts"] for c in cells if c.method == "full"}
    cells = [c for c in cells if c.tags["n_facts"] in sizes]  # a size without its FullFT run has no reference
    if not cells:
        print(f"No finished knee runs of scale {args.scale!r} at LoRA LR {args.lora_lr:g} / FullFT LR "
              f"{args.full_lr:g} under {args.workdir}/runs: train them with `lowregret sweep --config` first.",
              file=sys.stderr)
        return 2
    base = json.loads((Path(cells[0].run_dir) / "summary.json").read_text())["config"]["model"]
    table = knee_table(cells, base, SCALES[args.scale].facts_choices)
    for size in table["sizes"]:
        full = size["full"]["bits"]
        print(f"{size['n_facts']} facts, {size['information_bits']:,.0f} bits; FullFT stored {full['stored_bits']:,.0f}; "
              f"knee {size['measured_min_rank']}, planner (2 bits/param) {size['predicted']['min_rank_pow2']}, "
              f"within 2x: {size['within_2x']}")
        for row in size["ranks"]:
            print(f"  r={row['rank']:<3} params {row['adapter_params']:>7,} stored {row['bits']['stored_bits']:>8,.0f} "
                  f"({row['share_of_fullft']:.0%} of FullFT) bits/param {row['stored_bits_per_param']:.3f} "
                  f"late drop {row['late_drop'] if row['late_drop'] is None else round(row['late_drop'], 3)} "
                  f"gate {row['verdict']} {row['regret_nats']:+.3f}" + ("  UNSTABLE (loss rose above its start)" if row["unstable"] else ""))
    fit = table["fit"]
    print("fit:", "none (no capacity-bound run)" if fit is None else
          f"b = {fit['bits_per_param']:.3f} bits/param, interval {fit['interval']}, log-rmse {fit['log_rmse']:.2f}, "
          f"{len(fit['saturated'])} capacity-bound runs")
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=1, default=str) + "\n")
    if args.charts:
        from study.charts import bits_per_param_chart, knee_chart

        charts = Path(args.charts)
        charts.mkdir(parents=True, exist_ok=True)
        for draw, name in ((knee_chart, "knee.png"), (bits_per_param_chart, "bits_per_param.png")):
            print("chart:", draw({"knee": table}, charts / name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
