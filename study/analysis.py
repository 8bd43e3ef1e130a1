"""From the study's finished runs to its tables: one function per question of docs/STUDY.md.

Input: `Cell` records (what each run was, where it lies). Output: plain JSON-serialisable dicts,
written as docs/study/results.json and drawn by study/charts.py. Every regret goes through
`evaluation.compare.compare_runs` (the `lowregret compare` code) and every LR fit through
`evaluation.sweep.fit_lr_sweep` (`lowregret lr-sweep`); the planner's predictions come from
`planner.plan.build_plan` with the literature priors (`calibration={}`), so the study tests the
priors, not its own output.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass

from study import capacity as cap
from study.design import Scale, corpus_label


@dataclass(frozen=True)
class Cell:
    """One finished run of the study."""

    experiment: str
    part: str
    tags: dict
    method: str
    rank: int | None
    lr: float
    label: str
    run_key: str
    run_dir: str

    def to_dict(self) -> dict:
        return asdict(self)


def cells_manifest(reports_dir, scale_name: str):
    """reports/study-<scale>/cells.json, the cell list a finished study left (what --reanalyse reads).

    Raises:
        UserError: there is none (checked before Prefect is imported, so nothing is written).
    """
    from pathlib import Path

    from data.errors import UserError

    manifest = Path(reports_dir) / f"study-{scale_name}" / "cells.json"
    if not manifest.is_file():
        raise UserError(f"No finished {scale_name} study in {reports_dir} ({manifest.name} is missing): "
                        f"run `lowregret study{' --quick' if scale_name == 'quick' else ''}` there first.")
    return manifest


def _load(cell: Cell):
    from evaluation.runs import load_run

    return load_run(cell.run_dir)


def regret(lora: Cell | list[Cell], full: Cell | list[Cell]) -> dict:
    """LoRA − FullFT held-out loss (nats/token), its paired 95% interval and the gate's verdict,
    via `lowregret compare`'s code (`evaluation.compare.compare_runs`); lists are seed replicates."""
    from evaluation.compare import compare_runs

    loras, fulls = (lora if isinstance(lora, list) else [lora]), (full if isinstance(full, list) else [full])
    comparison, _, _ = compare_runs([c.run_dir for c in loras], [c.run_dir for c in fulls])
    interval = comparison.interval
    return {"regret_nats": comparison.regret_nats, "regret_low": comparison.regret_low,
            "regret_high": comparison.regret_high, "regret_relative": comparison.regret_relative,
            "allowed_nats": comparison.allowed_regret_nats, "passed": comparison.passed,
            "verdict": comparison.verdict, "examples": interval.examples, "seed_regrets": list(interval.seed_regrets),
            "full_seed_sd": interval.full_seed_sd, "recovered": interval.recovered,
            "lora_run": [c.run_key for c in loras] if len(loras) > 1 else loras[0].run_key,
            "full_run": [c.run_key for c in fulls] if len(fulls) > 1 else fulls[0].run_key}


def _final(cell: Cell) -> float:
    return float(_load(cell).get("final_eval_loss"))


# ------------------------------------------------------------------------------------------ knee


@functools.cache
def _value_score(spec, model_dir: str | None):
    """The NLL of the facts' values only (study.capacity.value_tokens_only) on a run's held-out
    examples, by the base (model_dir None) or a trained adapter/model; one model at a time."""
    from evaluation.nll import evaluate_models

    return evaluate_models(spec, [model_dir], relabel=cap.value_tokens_only)[0]


def absorbed(cell: Cell, information_bits: float) -> cap.Absorbed:
    """Bits a memorisation run absorbed and stored on the facts' values (study.capacity), scored
    again from its model on exactly its held-out examples (all its training facts)."""
    from evaluation.nll import run_model_dir, spec_from_run

    run = _load(cell)
    spec = spec_from_run(run)
    base, final = _value_score(spec, None), _value_score(spec, str(run_model_dir(run)))
    return cap.bits_absorbed(base.nats_per_token, final.nats_per_token, final.tokens, information_bits)


def late_drop(cell: Cell) -> float | None:
    """The share of a run's whole training-loss drop made in its last fifth of steps (mean train loss
    of the last tenth against that of the tenth before the last fifth): near 0 once it has converged."""
    train = _load(cell).curves["train"]
    n = len(train)
    if n < 20:
        return None
    losses = [loss for _, loss in train]
    tenth = n // 10
    before, last = statistics.fmean(losses[n - 3 * tenth: n - 2 * tenth]), statistics.fmean(losses[n - tenth:])
    total = losses[0] - last
    return (before - last) / total if total > 0 else None


def unstable(cell: Cell) -> bool | None:
    """Whether the run's training loss later rose above where it started (`capacity.rose_above_start`)."""
    return cap.rose_above_start([loss for _, loss in _load(cell).curves["train"]])


def planner_prediction(base_model: str, dataset: str, bits_per_param: float | None = None) -> dict:
    """The planner's smallest low-regret rank for the facts model on `dataset` (all targets).

    bits_per_param None: the literature prior (calibration={}), which is what the study tests.
    """
    from planner.plan import build_plan
    from planner.profile import profile_dataset

    profile = profile_dataset(dataset, base_model, method="exact")
    plan = build_plan(base_model, 1, profile=profile, calibration={}, bits_per_param=bits_per_param)
    c = plan.capacity
    return {"bits_per_param": c.bits_per_param, "information_bits": c.dataset_bits,
            "min_rank_pow2": c.min_rank_pow2, "min_rank_exact": c.min_rank_exact,
            "adapter_params_per_rank": plan.adapter_params}


def _pairs(cells: list[Cell]) -> tuple[dict, list[Cell]]:
    fulls = [c for c in cells if c.method == "full"]
    return {c.rank: c for c in cells if c.method == "lora"}, fulls


def knee_table(cells: list[Cell], base_model: str, choices: int) -> dict:
    """Per dataset size: FullFT and every rank's bits, regret and verdict; measured and predicted knee."""
    from data.builtin_datasets import facts_information_bits
    from study.design import facts_dataset

    by_size: dict[int, list[Cell]] = defaultdict(list)
    for c in cells:
        by_size[c.tags["n_facts"]].append(c)
    sizes, points = [], []
    for n in sorted(by_size):
        info = facts_information_bits(n, choices)
        loras, fulls = _pairs(by_size[n])
        full = fulls[0]
        full_bits = absorbed(full, info)
        rows, verdicts = [], {}
        for rank in sorted(loras):
            lora = loras[rank]
            bits = absorbed(lora, info)
            r = regret(lora, full)
            # Matching FullFT is judged on the values' bits; the gate's regret (whole answers) also
            # counts the template residual, which holds no information (study.capacity).
            verdicts[rank] = bits.stored_bits >= cap.MATCHED_SHARE * full_bits.stored_bits
            params = int(_load(lora).get("trainable_params"))
            rows.append({"rank": rank, "adapter_params": params, "bits": bits.to_dict(), **r,
                         "share_of_fullft": bits.stored_bits / full_bits.stored_bits if full_bits.stored_bits else None,
                         "matches_fullft": verdicts[rank],
                         "stored_bits_per_param": bits.stored_bits / params, "late_drop": late_drop(lora),
                         "unstable": unstable(lora), "run": lora.run_key})
            points.append({"params": params, "bits": bits.stored_bits, "full_bits": full_bits.stored_bits,
                           "size": n, "label": f"n{n}-r{rank}", "run": lora.run_key})
        prediction = planner_prediction(base_model, facts_dataset(n, choices))
        measured = cap.smallest_matching_rank(verdicts)
        sizes.append({
            "n_facts": n, "information_bits": info, "full": {"bits": full_bits.to_dict(), "run": full.run_key,
                                                            "lr": full.lr, "late_drop": late_drop(full),
                                                            "unstable": unstable(full)},
            "lora_lr": next(iter(loras.values())).lr, "ranks": rows, "measured_min_rank": measured,
            "predicted": prediction,
            "within_2x": cap.within_factor(prediction["min_rank_pow2"], measured),
        })
    fit = cap.fit_bits_per_param(points)
    out = {"sizes": sizes, "fit": fit.to_dict() if fit else None}
    if fit is not None:
        for size in sizes:  # what the planner would say with our b, in-sample and size left out
            size["predicted_with_fit"] = planner_prediction(base_model, facts_dataset(size["n_facts"], choices),
                                                            fit.bits_per_param)
            rest = [p for p in points if p["size"] != size["n_facts"]]
            held = cap.fit_bits_per_param(rest) if rest else None
            if held is not None:
                pred = planner_prediction(base_model, facts_dataset(size["n_facts"], choices), held.bits_per_param)
                size["predicted_leave_size_out"] = pred | {"within_2x": cap.within_factor(
                    pred["min_rank_pow2"], size["measured_min_rank"])}
    return out


# -------------------------------------------------------------------------------------------- LR


def lr_table(cells: list[Cell]) -> dict:
    """Per corpus: each method/rank's LR fit, the LoRA/FullFT ratio, how the optimum moves with rank,
    and whether the early training curves of all ranks coincide at one LR."""
    from evaluation.sweep import fit_lr_sweep, points_from_runs

    by_corpus: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        by_corpus[c.tags["corpus"]].append(c)
    corpora = {}
    for corpus, group in sorted(by_corpus.items()):
        points = points_from_runs([c.run_dir for c in group])
        fit = fit_lr_sweep(points)
        curves: dict[str, list] = defaultdict(list)
        for p in sorted(points, key=lambda p: p.lr):
            curves["FullFT" if p.method == "full" else f"LoRA r={p.rank}"].append([p.lr, p.final_loss])
        optima = {g.rank: g.optimum_lr for g in fit.groups if g.method == "lora" and g.status == "ok"}
        moves = (max(optima.values()) / min(optima.values())) if len(optima) > 1 else None
        corpora[corpus_label(corpus)] = {
            "corpus": corpus, "fit": fit.to_dict(), "loss_by_lr": dict(curves), "lora_optimum_by_rank": optima,
            "optimum_max_over_min": moves, "early_curves": early_curves(group),
            "verdicts": verdicts_at_best_lr(group, corpus),
            "runs": sorted(c.run_key for c in group),
        }
    ratios = [r["ratio"] for v in corpora.values() for r in v["fit"]["lr_ratios"]]
    return {"corpora": corpora, "ratios": ratios,
            "ratio_geometric_mean": math.exp(statistics.fmean(map(math.log, ratios))) if ratios else None}


def verdicts_at_best_lr(group: list[Cell], corpus: str) -> list[dict]:
    """Each rank at its best grid LR against FullFT at its own, beside the planner's verdict for that
    rank (literature priors, the dataset's information measured by lzma as `lowregret plan` does)."""
    from planner.plan import build_plan
    from planner.profile import profile_dataset

    fulls = [c for c in group if c.method == "full"]
    if not fulls:
        return []
    full = min(fulls, key=_final)
    model = _load(full).config["model"]
    profile = profile_dataset(corpus, model, method="lzma")
    rows = []
    for rank in sorted({c.rank for c in group if c.method == "lora"}):
        lora = min((c for c in group if c.method == "lora" and c.rank == rank), key=_final)
        plan = build_plan(model, rank, profile=profile, calibration={})
        rows.append({"rank": rank, "lora_lr": lora.lr, "full_lr": full.lr, "planner_verdict": plan.capacity.verdict,
                     "capacity_over_data": plan.capacity.capacity_over_data, **regret(lora, full)})
    return rows


def early_curves(group: list[Cell]) -> dict:
    """Training loss per step of every LoRA rank at the LR most ranks ran best at.

    All runs of a corpus use one seed, so step k is the same batch for every rank: the spread
    across ranks at a step is a paired difference. "Coincide" is judged against the loss drop.
    """
    loras = [c for c in group if c.method == "lora"]
    best: dict[int, tuple[float, float]] = {}
    for c in loras:
        loss = _final(c)
        if c.rank not in best or loss < best[c.rank][1]:
            best[c.rank] = (c.lr, loss)
    if not best:
        return {}
    lr = statistics.median_low(sorted(v[0] for v in best.values()))
    curves = {c.rank: _load(c).curves["train"] for c in loras if c.lr == lr}
    steps = sorted(set.intersection(*(set(s for s, _ in curve) for curve in curves.values())))
    table = {step: {rank: dict(curve)[step] for rank, curve in sorted(curves.items())} for step in steps}
    spreads = {step: max(v.values()) - min(v.values()) for step, v in table.items()}
    first = table[steps[0]]
    drop = statistics.fmean(first.values()) - statistics.fmean(table[steps[-1]].values())
    early = [s for s in steps if s <= max(2, steps[-1] // 4)]
    return {"lr": lr, "ranks": sorted(curves), "loss_by_step": {str(s): {str(r): v for r, v in row.items()}
                                                                  for s, row in table.items()},
            "spread_by_step": {str(s): v for s, v in spreads.items()},
            "early_steps": early, "max_early_spread": max(spreads[s] for s in early),
            "final_spread": spreads[steps[-1]], "loss_drop": drop}


# ---------------------------------------------------------------------------------------- layers


def layers_table(cells: list[Cell], full_by_model: dict[str, Cell], choices: int) -> dict:
    """Attention-only / MLP-only / all at matched parameter counts, against FullFT."""
    from data.builtin_datasets import facts_information_bits

    out = {}
    for model in ("facts", "lr"):
        rows = []
        for c in (c for c in cells if c.tags["model"] == model):
            run = _load(c)
            row = {"targets": c.tags["targets"], "rank": c.rank, "lr": c.lr, "run": c.run_key,
                   "adapter_params": int(run.get("trainable_params")), "final_loss": float(run.get("final_eval_loss"))}
            if model == "facts":
                row["bits"] = absorbed(c, facts_information_bits(c.tags["n_facts"], choices)).to_dict()
            if model in full_by_model:
                row |= regret(c, full_by_model[model])
            rows.append(row)
        out[model] = sorted(rows, key=lambda r: ("all", "mlp", "attention").index(r["targets"])
                            if r["targets"] in ("all", "mlp", "attention") else 9)
    return out


# ----------------------------------------------------------------------------------------- noise


def _pairs_by(cells: list[Cell], tag: str) -> dict:
    """{value of `tag`: {"lora": cell, "full": cell}}, in the tag's order (one LoRA/FullFT pair each)."""
    pairs: dict = defaultdict(dict)
    for c in cells:
        pairs[c.tags[tag]][c.method] = c
    return dict(sorted(pairs.items()))


def noise_table(cells: list[Cell]) -> dict:
    """The regret of one configuration over seeds: its spread is the gate's meaningful threshold."""
    by_seed = _pairs_by(cells, "seed")
    rows = []
    for seed, pair in by_seed.items():
        rows.append({"seed": seed, "lora_loss": _final(pair["lora"]), "full_loss": _final(pair["full"]),
                     **regret(pair["lora"], pair["full"])})
    regrets = [r["regret_nats"] for r in rows]
    fulls = [r["full_loss"] for r in rows]
    spread = statistics.stdev(regrets) if len(regrets) > 1 else None
    seeds = list(by_seed)
    pooled = regret([by_seed[s]["lora"] for s in seeds], [by_seed[s]["full"] for s in seeds]) if len(seeds) > 1 else None
    return {"seeds": rows, "regret_mean": statistics.fmean(regrets), "regret_sd": spread,
            "regret_range": max(regrets) - min(regrets), "full_loss_sd": statistics.stdev(fulls) if len(fulls) > 1 else None,
            "example_half_width_mean": statistics.fmean((r["regret_high"] - r["regret_low"]) / 2 for r in rows),
            "replicates": pooled, "suggested_threshold_abs": 2 * spread if spread is not None else None}


# ----------------------------------------------------------------------------------------- batch


def batch_table(cells: list[Cell], choices: int) -> dict:
    """LoRA against FullFT at each batch size (same passes over the data)."""
    from data.builtin_datasets import facts_information_bits

    rows = []
    for batch, pair in _pairs_by(cells, "batch").items():
        info = facts_information_bits(pair["lora"].tags["n_facts"], choices)
        rows.append({"batch": batch, "steps": int(_load(pair["lora"]).get("steps")),
                     "lora_lr": pair["lora"].lr, "full_lr": pair["full"].lr,
                     "lora": absorbed(pair["lora"], info).to_dict(), "full": absorbed(pair["full"], info).to_dict(),
                     "lora_unstable": unstable(pair["lora"]), "full_unstable": unstable(pair["full"]),
                     **regret(pair["lora"], pair["full"])})
    return {"batches": rows}


# ------------------------------------------------------------------------------------ the study


def best_lr(cells: list[Cell], method: str, rank: int | None = None) -> float:
    """The grid LR with the lowest final eval loss for a method (and rank): a cell that exists."""
    group = [c for c in cells if c.method == method and (rank is None or c.rank == rank)]
    return min(group, key=_final).lr


def analyse(cells: list[Cell], scale: Scale, base_model: str) -> dict:
    """Every table of the study from its finished cells."""
    by_exp: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        by_exp[c.experiment].append(c)
    # The knee parts list every cell they use, the LR sweep's at the chosen LRs included (same run
    # key); the LR sweep's other cells (other LRs of the same rank) must not stand in for them.
    knee_cells = list({c.run_key: c for c in by_exp["knee"]}.values())
    results = {"scale": scale.name, "base_model": base_model, "cells": len(cells), "lr_steps": scale.lr_steps}
    results["knee"] = knee_table(knee_cells, base_model, scale.facts_choices)
    results["lr"] = lr_table(by_exp["lr"])
    fulls = {}
    facts_full = [c for c in knee_cells if c.method == "full" and c.tags["n_facts"] == scale.mid_knee_size]
    if facts_full:
        fulls["facts"] = facts_full[0]
    first = [c for c in by_exp["lr"] if c.tags["corpus"] == scale.lr_corpora[0] and c.method == "full"]
    if first:
        fulls["lr"] = min(first, key=_final)
    results["layers"] = layers_table(by_exp["layers"], fulls, scale.facts_choices)
    results["noise"] = noise_table(by_exp["noise"])
    results["batch"] = batch_table(by_exp["batch"], scale.facts_choices)
    return results


def choose_lrs(cells: list[Cell], scale: Scale):
    """Stage 3's LRs from stage 2's cells: the best grid LR (an existing cell) of each method."""
    from study.design import ChosenLrs

    facts = [c for c in cells if c.experiment == "facts_lr"]
    first = [c for c in cells if c.experiment == "lr" and c.tags["corpus"] == scale.lr_corpora[0]]
    return ChosenLrs(facts_lora=best_lr(facts, "lora"), facts_full=best_lr(facts, "full"),
                     lr_lora=best_lr(first, "lora", scale.noise_rank), lr_full=best_lr(first, "full"))


def edge_extensions(cells: list[Cell], parts: list, limit: int | None = None) -> list[tuple]:
    """(part, method, rank, lr) for every LR-sweep group whose best grid LR is at an end of the grid;
    at most `limit` of them, FullFT groups first (every LoRA/FullFT ratio needs FullFT's optimum)."""
    from study.design import edge_extension_lr

    out = []
    for part in parts:
        group = [c for c in cells if c.part == part.name and c.experiment == "lr"]
        for method, rank in sorted({(c.method, c.rank) for c in group}, key=lambda k: (k[0], k[1] or 0)):
            runs = [c for c in group if (c.method, c.rank) == (method, rank)]
            lr = edge_extension_lr([c.lr for c in runs], min(runs, key=_final).lr)
            if lr is not None:
                out.append((part, method, rank, lr))
    out.sort(key=lambda e: e[1] != "full")  # stable: corpus order, then rank order within each method
    return out if limit is None else out[:limit]
