"""LoRA-vs-FullFT regret on the same held-out examples: a paired interval and a three-way verdict.

regret = LoRA held-out loss − FullFT held-out loss (nats per completion token), with a 95%
paired-bootstrap interval over the held-out examples (`evaluation.regret`; with seed replicates
the interval also covers training noise). PASS when the whole interval is within the allowed
regret, FAIL when it is entirely above, INCONCLUSIVE otherwise, with the number of held-out
examples that would likely decide it. Relative regret = regret / FullFT loss. "Recovered" =
(base − LoRA) / (base − FullFT), with its interval. Matched steps show how the gap developed, and
the hints say what the runs' own settings and curve shapes suggest.

`compare_runs` reads trainer output directories and refuses what is not a comparison: a run
against itself, two runs of one method, different base models, held-out sets or training data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from data.errors import UserError
from evaluation.curves import Curve
from evaluation.regret import FAIL, INCONCLUSIVE, PASS, RegretInterval, decide, regret_interval
from evaluation.runs import HeldOutLosses, RunRecord, load_run, paired_losses
from planner.advice import (
    BATCH_SMALL_PENALTY_ABOVE,
    LORA_OVER_FULLFT_LR,
    SHORT_RUN_LORA_OVER_FULLFT_LR,
    SHORT_RUN_STEPS,
)

# Default pass mark. "LoRA Without Regret" (Thinking Machines, 2025) finds that LoRA at adequate
# rank with ~10x FullFT's LR matches FullFT's loss curve, i.e. the two differ by no more than
# run-to-run noise. We turn "within noise" into: LoRA's held-out loss may exceed FullFT's by at
# most 1% of FullFT's loss, with a floor of 0.01 nats/token for runs whose loss gets close to zero
# (where 1% of it is below any seed noise). The verdict asks the whole 95% interval to be within
# it. See docs/EVALUATION.md.
DEFAULT_RELATIVE_THRESHOLD = 0.01
DEFAULT_ABSOLUTE_THRESHOLD_NATS = 0.01
# Exit codes of `compare --exit-code` and `pipeline` (2 is bad input, as for every command).
EXIT_CODES = {PASS: 0, FAIL: 1, INCONCLUSIVE: 3}
# Below these the pipeline warns before training that the comparison may not decide.
MIN_DECISIVE_EXAMPLES = 200
# A LoRA/FullFT LR ratio this far (×) from the advised multiplier is called out in the hints.
LR_RATIO_TOLERANCE = 1.5


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
    """LoRA and FullFT eval loss at one step both runs evaluated (means over seeds)."""

    step: int
    lora_loss: float
    full_loss: float
    regret_nats: float
    regret_relative: float


@dataclass(frozen=True)
class RunFacts:
    """What was run, for the hints: the LoRA and FullFT learning rates, global batch and steps."""

    lora_lr: float | None = None
    full_lr: float | None = None
    global_batch: int | None = None
    steps: int | None = None
    rank: int | None = None


@dataclass(frozen=True)
class Comparison:
    """The regret of LoRA against FullFT with its interval and verdict. Losses in nats/token."""

    lora_final: float
    full_final: float
    regret_nats: float
    regret_low: float
    regret_high: float
    regret_relative: float
    allowed_regret_nats: float
    verdict: str
    """PASS, FAIL or INCONCLUSIVE."""
    message: str
    """The verdict as one sentence."""
    interval: RegretInterval
    examples_needed: int | None = None
    threshold: RegretThreshold = field(default_factory=RegretThreshold)
    base_loss: float | None = None
    matched: tuple[MatchedPoint, ...] = ()
    facts: RunFacts = field(default_factory=RunFacts)
    hints: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def recovered_fraction(self) -> float | None:
        return self.interval.recovered

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record.update(passed=self.passed, recovered_fraction=self.recovered_fraction)
        return record


def _relative(regret: float, full_loss: float) -> float:
    if full_loss > 0:
        return regret / full_loss
    return 0.0 if regret == 0 else math.copysign(math.inf, regret)


def matched_points(lora_evals: list[Curve], full_evals: list[Curve]) -> tuple[MatchedPoint, ...]:
    """Regret at every step > 0 that every run evaluated, losses averaged over seeds (no interpolation).

    Step 0 is left out: both runs are still the base model there.
    """
    loras, fulls = [dict(c) for c in lora_evals], [dict(c) for c in full_evals]
    steps = sorted(set.intersection(*(set(c) for c in loras + fulls)) - {0}) if loras and fulls else []
    points = []
    for step in steps:
        lora = sum(c[step] for c in loras) / len(loras)
        full = sum(c[step] for c in fulls) / len(fulls)
        points.append(MatchedPoint(step, lora, full, lora - full, _relative(lora - full, full)))
    return tuple(points)


def compare(
    held_out: HeldOutLosses,
    *,
    threshold: RegretThreshold | float | None = None,
    lora_evals: list[Curve] = (),
    full_evals: list[Curve] = (),
    facts: RunFacts | None = None,
) -> Comparison:
    """Regret of LoRA against FullFT on the same held-out examples, with interval and verdict.

    Args:
        held_out: per-example tokens and NLL sums (seed replicates as rows; base for "recovered").
        threshold: a `RegretThreshold`, or a float meaning a relative threshold with the default
            absolute floor; None is the default (1%, floor 0.01 nats/token).
        lora_evals, full_evals: each run's eval curve, for the matched steps and the shape hints.
        facts: what was run (LRs, batch, steps) for the hints.
    """
    if threshold is None:
        threshold = RegretThreshold()
    elif not isinstance(threshold, RegretThreshold):
        threshold = RegretThreshold(relative=float(threshold))
    facts = facts or RunFacts()
    tokens = sum(held_out.tokens)
    lora_final = sum(sum(row) for row in held_out.lora) / len(held_out.lora) / tokens
    full_final = sum(sum(row) for row in held_out.full) / len(held_out.full) / tokens
    interval = regret_interval(held_out.tokens, held_out.lora, held_out.full, held_out.base)
    allowed = threshold.allowed_nats(full_final)
    verdict = decide(interval, allowed)
    matched = matched_points(list(lora_evals), list(full_evals))
    notes = []
    if held_out.base is not None and interval.recovered is None:
        notes.append("FullFT did not improve on the base model, so 'recovered' is undefined.")
    if not matched:
        notes.append("No eval step (> 0) is common to the runs: give them the same max_steps and eval_points "
                     "to compare along the curve.")
    return Comparison(
        lora_final=lora_final,
        full_final=full_final,
        regret_nats=interval.regret_nats,
        regret_low=interval.low,
        regret_high=interval.high,
        regret_relative=_relative(interval.regret_nats, full_final),
        allowed_regret_nats=allowed,
        verdict=verdict.label,
        message=_message(verdict.label, interval, allowed, verdict.examples_needed),
        interval=interval,
        examples_needed=verdict.examples_needed,
        threshold=threshold,
        base_loss=None if held_out.base is None else sum(held_out.base) / tokens,
        matched=matched,
        facts=facts,
        hints=tuple(hints(verdict.label, interval, allowed, matched, facts)),
        notes=tuple(notes),
    )


def _message(label: str, interval: RegretInterval, allowed: float, needed: int | None) -> str:
    ci = f"{interval.confidence:.0%} interval [{interval.low:+.4f}, {interval.high:+.4f}]"
    if label == PASS:
        return f"PASS: LoRA matches FullFT: the whole {ci} is within the allowed {allowed:.4f} nats/token."
    if label == FAIL:
        return f"FAIL: LoRA trails FullFT: the whole {ci} is above the allowed {allowed:.4f} nats/token."
    if needed is not None:
        decide_it = (f"about {needed:,} held-out examples would likely decide it "
                     f"(this comparison had {interval.examples:,})")
    elif interval.seed_half_width >= abs(allowed - interval.regret_nats) > 0:
        decide_it = "seed noise alone spans the threshold: more seed replicates, not more examples, would decide it"
    else:
        decide_it = "the regret sits on the threshold: no amount of held-out data would decide it"
    return f"INCONCLUSIVE: the {ci} contains the allowed {allowed:.4f} nats/token; {decide_it}."


def hints(label: str, interval: RegretInterval, allowed: float, matched: tuple[MatchedPoint, ...],
          facts: RunFacts) -> list[str]:
    """Advice from what was run, labelled by what it points to; none for a PASS.

    The LR ratio, batch and steps are the runs' own; the curve shape reads the matched steps: a gap
    already at the first eval that stays points to the LR or too few steps, a gap that opens late
    and keeps growing is the capacity signature of "LoRA Without Regret".
    """
    if label == PASS:
        return []
    found = []
    short = facts.steps is not None and facts.steps < SHORT_RUN_STEPS
    if facts.lora_lr and facts.full_lr:
        ratio = facts.lora_lr / facts.full_lr
        advised = SHORT_RUN_LORA_OVER_FULLFT_LR if short else LORA_OVER_FULLFT_LR
        if max(ratio / advised, advised / ratio) > LR_RATIO_TOLERANCE:
            run = f" for a run of {facts.steps} steps" if facts.steps is not None else ""
            found.append(f"hint (LR): the LoRA LR was {ratio:.3g}x FullFT's; the blog's optimum is ~{advised:g}x"
                         f"{run}: try LoRA LR {facts.full_lr * advised:.3g}.")
    if facts.global_batch is not None and facts.global_batch > BATCH_SMALL_PENALTY_ABOVE:
        found.append(f"hint (batch): global batch {facts.global_batch} > {BATCH_SMALL_PENALTY_ABOVE}: LoRA pays a "
                     "loss penalty that grows with batch size and rank does not remove; try a smaller batch.")
    if short:
        found.append(f"hint (steps): {facts.steps} steps (< {SHORT_RUN_STEPS}): both methods are early in "
                     "training, where a fixed LR ratio matters most; train longer before judging capacity.")
    if len(matched) >= 2 and interval.regret_nats > 0:
        first, last = matched[0], matched[-1]
        if first.regret_nats >= 0.5 * last.regret_nats:
            found.append(f"hint (LR or steps): the gap was already {first.regret_nats:+.4f} at the first eval "
                         f"(step {first.step}) and is {last.regret_nats:+.4f} at step {last.step}: an offset "
                         "from the start points to the learning rate or too few steps, not to capacity.")
        elif last.regret_nats > allowed:
            found.append(f"hint (capacity): the gap grew from {first.regret_nats:+.4f} (step {first.step}) to "
                         f"{last.regret_nats:+.4f} (step {last.step}): a late divergence is the capacity "
                         f"signature; try a higher rank than {facts.rank}.")
    return found


def design_warnings(steps: int, held_out_examples: int) -> list[str]:
    """Warnings, before any training, that a comparison of this size will likely not decide."""
    found = []
    if held_out_examples < MIN_DECISIVE_EXAMPLES:
        found.append(
            f"{held_out_examples} held-out examples (< {MIN_DECISIVE_EXAMPLES}): the regret's interval will be wide "
            "and the verdict may be INCONCLUSIVE; raise eval_max_examples or the held-out share.")
    if steps < SHORT_RUN_STEPS:
        found.append(f"{steps} steps (< {SHORT_RUN_STEPS}): the comparison measures early training only.")
    return found


# ----------------------------------------------------------------------------- runs on disk


def compare_runs(
    lora_dirs: str | Path | list,
    full_dirs: str | Path | list,
    *,
    threshold: RegretThreshold | float | None = None,
) -> tuple[Comparison, list[RunRecord], list[RunRecord]]:
    """`compare` trainer output directories: one LoRA and one FullFT run, or seed replicates of each
    (read and checked as every comparison's runs are: `evaluation.runs`).

    Replicates pair by seed. Losses come from each run's per-example held-out file (the final eval);
    the base model's from the step-0 eval of the FullFT runs.

    Raises:
        UserError: a run is missing or unreadable, or `check_comparable` refuses the runs.
    """
    lora_dirs = lora_dirs if isinstance(lora_dirs, list) else [lora_dirs]
    full_dirs = full_dirs if isinstance(full_dirs, list) else [full_dirs]
    held_out, lora, full = paired_losses([load_run(d) for d in lora_dirs], [load_run(d) for d in full_dirs])
    config = lora[0].config
    facts = RunFacts(lora_lr=config.get("lr"), full_lr=full[0].config.get("lr"),
                     global_batch=lora[0].get("global_batch"), steps=lora[0].get("steps"), rank=config.get("rank"))
    comparison = compare(held_out, threshold=threshold, lora_evals=[r.curves["eval"] for r in lora],
                         full_evals=[r.curves["eval"] for r in full], facts=facts)
    return comparison, lora, full
