"""LoRA-vs-FullFT regret: how much higher LoRA's held-out loss is than full fine-tuning's.

regret = LoRA eval loss − FullFT eval loss (nats per completion token), at the end of training
and at every step where both runs measured eval loss. Relative regret = regret / FullFT loss.
Negative regret means LoRA did better. "Recovered" = (base − LoRA) / (base − FullFT): the
fraction of FullFT's improvement over the base model that LoRA also achieved.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.curves import Curve, load_curves
from planner.errors import UserError

# Default pass mark. "LoRA Without Regret" (Thinking Machines, 2025) finds that LoRA at adequate
# rank with ~10x FullFT's LR matches FullFT's loss curve, i.e. the two differ by no more than
# run-to-run noise. We turn "within noise" into: LoRA's final held-out loss may exceed FullFT's
# by at most 1% of FullFT's loss, with a floor of 0.01 nats/token for runs whose loss gets close
# to zero (where 1% of it is below any seed noise). Both runs are scored on the same held-out
# examples, so eval-set sampling noise cancels in the difference; what remains is training noise,
# which the user should measure (two FullFT seeds compared with `lowregret compare`) and use to
# set --threshold / --threshold-abs. See docs/EVALUATION.md.
DEFAULT_RELATIVE_THRESHOLD = 0.01
DEFAULT_ABSOLUTE_THRESHOLD_NATS = 0.01

# Two runs' step-0 eval losses (both the base model on the same examples) may differ by float
# noise only; more than this means different held-out sets or base models.
_STEP0_RELATIVE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class RegretThreshold:
    """When LoRA counts as matching FullFT: regret <= max(relative * FullFT loss, absolute_nats)."""

    relative: float = DEFAULT_RELATIVE_THRESHOLD
    """Allowed regret as a fraction of FullFT's final loss (0.01 = 1%)."""
    absolute_nats: float = DEFAULT_ABSOLUTE_THRESHOLD_NATS
    """Allowed regret in nats per token whatever FullFT's loss (the floor for near-zero losses)."""

    def __post_init__(self):
        if not (self.relative >= 0 and self.absolute_nats >= 0):
            raise UserError(
                f"Regret thresholds must be >= 0 (got relative={self.relative}, "
                f"absolute={self.absolute_nats}); e.g. --threshold 0.01 --threshold-abs 0.01."
            )

    def allowed_nats(self, full_loss: float) -> float:
        """The largest regret (nats/token) that still passes against this FullFT loss."""
        return max(self.relative * full_loss, self.absolute_nats)


@dataclass(frozen=True)
class MatchedPoint:
    """LoRA and FullFT eval loss at one step both runs evaluated."""

    step: int
    lora_loss: float
    full_loss: float
    regret_nats: float
    regret_relative: float


@dataclass(frozen=True)
class Comparison:
    """The regret of a LoRA run against a FullFT run, with the verdict. Losses in nats/token."""

    lora_final: float
    full_final: float
    regret_nats: float
    regret_relative: float
    allowed_regret_nats: float
    passed: bool
    verdict: str
    threshold: RegretThreshold = field(default_factory=RegretThreshold)
    base_loss: float | None = None
    recovered_fraction: float | None = None
    matched: tuple[MatchedPoint, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def worst_matched(self) -> MatchedPoint | None:
        """The matched step where LoRA trails FullFT most (None when no step matched)."""
        return max(self.matched, key=lambda p: p.regret_nats, default=None)

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        worst = self.worst_matched
        record["worst_matched"] = dataclasses.asdict(worst) if worst else None
        return record


def _relative(regret: float, full_loss: float) -> float:
    if full_loss > 0:
        return regret / full_loss
    return 0.0 if regret == 0 else math.copysign(math.inf, regret)


def matched_points(lora_eval: Curve, full_eval: Curve) -> tuple[MatchedPoint, ...]:
    """Regret at every step > 0 present in both eval curves (no interpolation).

    Step 0 is left out: both runs are still the base model there, so its regret says nothing about
    the methods (it is used as the base loss instead).
    """
    full_by_step = dict(full_eval)
    points = []
    for step, lora_loss in lora_eval:
        if step > 0 and step in full_by_step:
            full_loss = full_by_step[step]
            regret = lora_loss - full_loss
            points.append(MatchedPoint(step, lora_loss, full_loss, regret, _relative(regret, full_loss)))
    return tuple(points)


def _base_from_step0(lora_eval: Curve, full_eval: Curve, notes: list[str]) -> float | None:
    lora0 = dict(lora_eval).get(0)
    full0 = dict(full_eval).get(0)
    if lora0 is None or full0 is None:
        return None
    if abs(lora0 - full0) > _STEP0_RELATIVE_TOLERANCE * max(abs(full0), 1e-12):
        notes.append(
            f"The runs' step-0 eval losses differ ({lora0:.4f} vs {full0:.4f}) although both are the "
            "base model: they were probably scored on different held-out examples or base models."
        )
        return None
    return full0


def compare(
    lora_curves: dict[str, Curve],
    full_curves: dict[str, Curve],
    *,
    lora_final: float | None = None,
    full_final: float | None = None,
    threshold: RegretThreshold | float | None = None,
    base_loss: float | None = None,
) -> Comparison:
    """Regret of LoRA against FullFT, at the end and at matched steps, with a pass/fail verdict.

    Args:
        lora_curves, full_curves: curves records ({"train": ..., "eval": ...}); only "eval" is used.
        lora_final, full_final: final held-out losses (nats/token); None takes the curve's last
            eval point.
        threshold: a `RegretThreshold`, or a float meaning a relative threshold with the default
            absolute floor; None is the default (1%, floor 0.01 nats/token).
        base_loss: the base model's loss on the same held-out examples; None takes the runs'
            step-0 eval point when both have one and they agree.

    Returns:
        A `Comparison`; `passed` is regret <= threshold.allowed_nats(full_final).

    Raises:
        UserError: a final loss is missing and the run has no eval curve to take it from.
    """
    if threshold is None:
        threshold = RegretThreshold()
    elif not isinstance(threshold, RegretThreshold):
        threshold = RegretThreshold(relative=float(threshold))
    lora_eval, full_eval = lora_curves.get("eval", []), full_curves.get("eval", [])
    lora_final = _final(lora_final, lora_eval, "LoRA")
    full_final = _final(full_final, full_eval, "FullFT")
    notes: list[str] = []

    regret = lora_final - full_final
    relative = _relative(regret, full_final)
    allowed = threshold.allowed_nats(full_final)
    passed = regret <= allowed

    if base_loss is None:
        base_loss = _base_from_step0(lora_eval, full_eval, notes)
    recovered = None
    if base_loss is not None:
        if base_loss - full_final > 0:
            recovered = (base_loss - lora_final) / (base_loss - full_final)
        else:
            notes.append("FullFT did not improve on the base model, so 'recovered' is undefined.")

    matched = matched_points(lora_eval, full_eval)
    if not matched:
        notes.append(
            "No eval step (> 0) is common to both runs, so only the final losses are compared; "
            "give both runs the same max_steps and eval_points to compare along the curve."
        )
    verdict = _verdict(passed, regret, relative, allowed)
    return Comparison(
        lora_final=lora_final,
        full_final=full_final,
        regret_nats=regret,
        regret_relative=relative,
        allowed_regret_nats=allowed,
        passed=passed,
        verdict=verdict,
        threshold=threshold,
        base_loss=base_loss,
        recovered_fraction=recovered,
        matched=matched,
        notes=tuple(notes),
    )


def _final(final: float | None, eval_curve: Curve, name: str) -> float:
    if final is not None:
        return float(final)
    if not eval_curve:
        raise UserError(
            f"The {name} run has no final eval loss and no eval curve: train it with eval_points > 0 "
            "or score it with `lowregret evaluate` and pass the loss."
        )
    return eval_curve[-1][1]


def _verdict(passed: bool, regret: float, relative: float, allowed: float) -> str:
    gap = f"{regret:+.4f} nats/token ({relative:+.2%} of FullFT's loss; allowed {allowed:.4f})"
    if passed:
        return f"PASS: LoRA matches FullFT within the threshold, regret {gap}."
    return (
        f"FAIL: LoRA trails FullFT by {gap}. Try a higher rank, a LoRA LR about 10x FullFT's, "
        "or a smaller batch (LoRA pays more at large batch sizes)."
    )


# ----------------------------------------------------------------------------- runs on disk

# Config keys that decide which held-out examples a run was scored on (and against which base
# model). Two runs that differ in any of them cannot be compared loss for loss.
HELD_OUT_KEYS = (
    "model",
    "dataset",
    "eval_dataset",
    "eval_fraction",
    "seed",
    "max_length",
    "eval_max_examples",
    "dataset_limit",
)


@dataclass(frozen=True)
class RunRecord:
    """A finished training run read from its output directory."""

    path: Path
    summary: dict
    curves: dict[str, Curve]

    @property
    def config(self) -> dict:
        return self.summary.get("config") or {}

    def get(self, name: str):
        """A TrainResult field, from summary.json's top level or its "result" object."""
        if name in self.summary:
            return self.summary[name]
        return (self.summary.get("result") or {}).get(name)

    @property
    def method(self) -> str | None:
        return self.get("method") or self.config.get("method")


def load_run(run_dir: str | Path) -> RunRecord:
    """Read a trainer output directory: summary.json and curves.json.

    Raises:
        UserError: the directory, summary.json or curves.json is missing or unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"Run directory {run_dir} not found: pass the trainer's output_dir.")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise UserError(
            f"{run_dir} has no summary.json, so it is not a finished training run (the trainer "
            "writes it last). Pass the run's output_dir after `lowregret train` has completed."
        )
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{summary_path} is not valid JSON ({exc}); re-run the trainer.") from exc
    if not isinstance(summary, dict):
        raise UserError(f"{summary_path} should hold a JSON object; re-run the trainer.")
    curves_path = run_dir / "curves.json"
    if not curves_path.is_file():
        raise UserError(f"{run_dir} has summary.json but no curves.json; re-run the trainer.")
    return RunRecord(path=run_dir, summary=summary, curves=load_curves(curves_path))


def held_out_mismatches(lora: RunRecord, full: RunRecord) -> list[str]:
    """The HELD_OUT_KEYS on which two runs' configs disagree, as readable lines."""
    keys = HELD_OUT_KEYS
    if lora.config.get("eval_dataset") and full.config.get("eval_dataset"):
        # A separate eval set is read whole: the split's fraction, seed and row limit do not touch it.
        keys = tuple(k for k in keys if k not in ("eval_fraction", "seed", "dataset_limit"))
    return [
        f"{key}: LoRA {lora.config.get(key)!r} vs FullFT {full.config.get(key)!r}"
        for key in keys
        if lora.config.get(key) != full.config.get(key)
    ]


def compare_runs(
    lora_dir: str | Path,
    full_dir: str | Path,
    *,
    threshold: RegretThreshold | float | None = None,
    base_loss: float | None = None,
    allow_mismatch: bool = False,
) -> tuple[Comparison, RunRecord, RunRecord]:
    """`compare` two trainer output directories (final losses from summary.json).

    Raises:
        UserError: a run is missing or unreadable, the methods are swapped (a FullFT run as
            --lora and a LoRA run as --full), or the runs were scored on different held-out sets
            (unless allow_mismatch). Two runs of one method are compared, with a note: that is
            how run-to-run noise is measured.
    """
    lora, full = load_run(lora_dir), load_run(full_dir)
    if (lora.method, full.method) == ("full", "lora"):
        raise UserError(f"--lora {lora.path} is a FullFT run and --full {full.path} a LoRA run: swap them.")
    notes = []
    if lora.method is not None and lora.method == full.method:
        # Two runs of one method (e.g. two seeds) measure run-to-run noise: allowed, and said so.
        notes.append(
            f"Both runs are {lora.method!r} runs: the 'regret' is run-to-run noise, not LoRA's regret."
        )
    mismatches = held_out_mismatches(lora, full)
    if mismatches and not allow_mismatch:
        raise UserError(
            "The runs were not scored on the same held-out examples, so their losses do not "
            "compare: " + "; ".join(mismatches) + ". Retrain one of them to match, or pass "
            "--allow-mismatch if you know the differences do not matter."
        )
    comparison = compare(
        lora.curves,
        full.curves,
        lora_final=lora.get("final_eval_loss"),
        full_final=full.get("final_eval_loss"),
        threshold=threshold,
        base_loss=base_loss,
    )
    if mismatches:
        notes.append("Compared despite differing held-out settings: " + "; ".join(mismatches) + ".")
    if notes:
        comparison = dataclasses.replace(comparison, notes=comparison.notes + tuple(notes))
    return comparison, lora, full
