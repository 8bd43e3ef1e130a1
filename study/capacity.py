"""Capacity from runs: bits a run absorbed, where each rank falls off FullFT, bits per parameter.

A facts run is scored on its own training facts (eval_dataset = dataset, every fact), so its
held-out loss is a memorisation loss. The bits are counted on the facts' values only
(`value_tokens_only`: in "The favourite colour of Rakor is pink." only " pink"): the rest of an
answer is a function of the question and holds no information, but a base can still pay for it
(the study's memorised base had forgotten how to copy a new name into the answer: 8 nats on its
first token), and counted in, that template residual hid everything LoRA stored (the first run of
the study reported 0 stored bits at every rank for that reason; docs/STUDY.md). Value losses ×
value tokens / ln 2 are the values' summed code lengths in bits. Two measures:

- absorbed = base bits − final bits: how much shorter the values' code got (the issue's "base
  loss − final loss"). It also counts undoing the base's own wrong guesses.
- stored = n_facts · log2(choices) − final bits, at least 0: a lower bound on what the model knows
  about the values. The values are uniform and independent, so a model that knows nothing about
  them pays at least log2(choices) bits per fact; every bit below that total is information about
  the facts. This is Allen-Zhu & Li's capacity measure, and the one fitted below.

An adapter with fewer bits of capacity than the data saturates: stored ≈ bits_per_param × adapter
params. With more, it stores what FullFT stores. So bits_r = min(b · P_r, B_full) over the runs of
all sizes, fitted for b (least squares on log bits). That b is what `planner/calibration.json` holds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

LN2 = math.log(2)
# A rank "matches FullFT" on a facts set when it stores at least this share of FullFT's stored bits:
# the knee is the smallest rank from which every larger one does (`smallest_matching_rank`).
MATCHED_SHARE = 0.9


def value_tokens_only(example, tokenizer):
    """`example` (a `builtin:facts` row tokenized as the trainer tokenizes it) with only the tokens
    of its value left trained, so a score counts the value's code length and nothing else.

    A facts answer reads "The <attribute> of <entity> is <value>." (data.builtin_datasets.
    facts_rows); the value is the text between the answer's last " is " and the "." after it.
    A token is kept when its characters (decoding the trained tokens one more at a time) overlap
    the value's: " pink" (space and value) is, " is" and "." are not.

    Raises:
        ValueError: the trained text is not a facts answer.
    """
    from data.dataset import IGNORE_INDEX

    trained = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    ids = [example.input_ids[i] for i in trained]
    text = tokenizer.decode(ids)
    start = text.rfind(" is ")
    end = text.find(".", start + 4) if start >= 0 else -1
    if end < 0:
        raise ValueError(f"not a facts answer (\"... is <value>.\"): {text!r}")
    start += len(" is ")
    labels = [IGNORE_INDEX] * len(example.labels)
    begin = 0
    for k, i in enumerate(trained):
        stop = len(tokenizer.decode(ids[: k + 1]))
        if begin < end and stop > start:  # this token's characters [begin, stop) overlap the value's
            labels[i] = example.labels[i]
        begin = stop
    return replace(example, labels=labels)


@dataclass(frozen=True)
class Absorbed:
    """What one memorisation run took in, in bits (see the module docstring)."""

    base_loss: float
    final_loss: float
    completion_tokens: int
    information_bits: float
    base_bits: float
    final_bits: float
    absorbed_bits: float
    stored_bits: float

    @property
    def stored_fraction(self) -> float:
        return self.stored_bits / self.information_bits

    def to_dict(self) -> dict:
        return asdict(self) | {"stored_fraction": self.stored_fraction}


def bits_absorbed(base_loss: float, final_loss: float, completion_tokens: int, information_bits: float) -> Absorbed:
    """Both measures of the module docstring from a run's losses (nats per completion token)."""
    base_bits, final_bits = base_loss * completion_tokens / LN2, final_loss * completion_tokens / LN2
    return Absorbed(base_loss, final_loss, completion_tokens, information_bits, base_bits, final_bits,
                    base_bits - final_bits, max(0.0, information_bits - final_bits))


@dataclass(frozen=True)
class BitsPerParamFit:
    """bits_r = min(b · params_r, full_bits) fitted over LoRA runs.

    Attributes:
        bits_per_param: the fitted b.
        log_rmse: root-mean-square residual of log(bits) (how well the two-regime model fits).
        saturated: the runs the fit says are capacity-bound (b · params < FullFT's bits), with each
            run's own bits / params.
        runs: every point used (params, bits, full_bits, label).
        interval: (low, high): the range of b over leave-one-size-out refits (how much b depends on
            which dataset sizes are in the fit); None with a single size.
    """

    bits_per_param: float
    log_rmse: float
    saturated: tuple[dict, ...]
    runs: tuple[dict, ...]
    interval: tuple[float, float] | None

    def to_dict(self) -> dict:
        return asdict(self)


def _fit_b(points: list[dict]) -> tuple[float, float]:
    """Least squares on log bits of min(b · params, full_bits); b searched on a log grid, refined."""
    from scipy.optimize import minimize_scalar

    def loss(log_b: float) -> float:
        b = math.exp(log_b)
        return sum((math.log(max(p["bits"], 1e-9)) - math.log(min(b * p["params"], p["full_bits"]))) ** 2
                   for p in points)

    grid = [math.log(10 ** (k / 20)) for k in range(-80, 41)]  # 1e-4 .. 1e2 bits/param
    start = min(grid, key=loss)
    best = minimize_scalar(loss, bounds=(start - 0.2, start + 0.2), method="bounded")
    return math.exp(best.x), math.sqrt(best.fun / len(points))


def fit_bits_per_param(points: list[dict]) -> BitsPerParamFit | None:
    """Fit b from LoRA runs: dicts with params, bits, full_bits (FullFT's bits at that size), size, label.

    Runs that absorbed nothing (bits <= 0) are dropped: a log has no place for them and they say
    the run did not train, not how much an adapter holds. Returns None when no run is
    capacity-bound at any b, i.e. when the data cannot tell b (every rank matched FullFT).
    """
    points = [p for p in points if p["bits"] > 0 and p["full_bits"] > 0]
    if not points:
        return None
    b, rmse = _fit_b(points)
    saturated = tuple(p | {"bits_per_param": p["bits"] / p["params"]} for p in points if b * p["params"] < p["full_bits"])
    if not saturated:
        return None
    sizes = sorted({p["size"] for p in points})
    interval = None
    if len(sizes) > 1:
        refits = []
        for left_out in sizes:
            rest = [p for p in points if p["size"] != left_out]
            if any(b * p["params"] < p["full_bits"] for p in rest):
                refits.append(_fit_b(rest)[0])
        interval = (min(refits), max(refits)) if refits else None
    return BitsPerParamFit(b, rmse, saturated, tuple(points), interval)


def short_of_fullft(bits_per_param: float, runs, spare: float = 2.0, matched: float = MATCHED_SHARE) -> list[dict]:
    """The runs (BitsPerParamFit.runs) that a fit of b gives capacity to spare (b · params >=
    `spare` × FullFT's bits) and that stored less than `matched` of FullFT's bits. The two-regime
    model says such a run stores what FullFT does; one that does not was held back by something
    other than its adapter's size (its optimisation), and so, probably, were the runs the fit calls
    capacity-bound: their bits/param bound b from below."""
    b = bits_per_param
    return [p for p in runs if b * p["params"] >= spare * p["full_bits"] and p["bits"] < matched * p["full_bits"]]


def rose_above_start(losses: list[float], windows: int = 10) -> bool | None:
    """Whether a training curve, averaged over `windows` equal spans of steps, rose above its first
    span's mean later on: at some point the run lost all it had learned, whether or not it recovered
    (an LR at the edge of stability for a run this long). None when the curve is too short to tell
    (fewer than 2 steps per span)."""
    width = len(losses) // windows
    if width < 2:
        return None
    means = [sum(losses[i * width:(i + 1) * width]) / width for i in range(windows)]
    return any(m > means[0] for m in means[1:])


def smallest_matching_rank(verdicts: dict[int, bool]) -> int | None:
    """The smallest rank from which every larger rank in the grid matches FullFT (None: none does)."""
    ranks = sorted(verdicts)
    for i, rank in enumerate(ranks):
        if all(verdicts[r] for r in ranks[i:]):
            return rank
    return None


def within_factor(predicted: int | None, measured: int | None, factor: float = 2.0) -> bool | None:
    """predicted / measured within [1/factor, factor]; None when either is unknown."""
    if predicted is None or measured is None:
        return None
    return 1 / factor <= predicted / measured <= factor
