"""Learning curves: read a run's curves.json and draw every run's loss on one log-step chart.

A curves record is the trainer's `curves.json` (docs/ARCHITECTURE.md, "Trainer"):
`{"train": [[step, loss], ...], "eval": [[step, loss], ...]}`, losses in nats per completion token.
matplotlib is imported inside `plot_curves`, so importing this module stays light.
"""

from __future__ import annotations

import math
from pathlib import Path

from data.errors import UserError

# One curve: (step, loss) pairs in step order.
Curve = list[tuple[int, float]]

CURVE_KINDS = ("train", "eval")


def parse_curves(record: dict, origin: str = "curves") -> dict[str, Curve]:
    """Validate a curves record and return {"train": curve, "eval": curve}, sorted by step.

    A missing kind is an empty curve (a run with no eval points still has a train curve).

    Raises:
        UserError: the record is not a dict of [step, loss] pairs; `origin` names it in the message.
    """
    if not isinstance(record, dict):
        raise UserError(f"{origin}: expected a JSON object with 'train' and 'eval' lists of [step, loss].")
    curves: dict[str, Curve] = {}
    for kind in CURVE_KINDS:
        points = record.get(kind, [])
        if not isinstance(points, list):
            raise UserError(f"{origin}: {kind!r} is {type(points).__name__}, not a list of [step, loss]. "
                            "Re-run the trainer or fix the file.")
        parsed = []
        for point in points:
            if (
                not isinstance(point, (list, tuple))
                or len(point) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)
            ):
                raise UserError(
                    f"{origin}: {kind!r} holds {point!r:.80}; each point must be [step, loss]. "
                    "Re-run the trainer or fix the file."
                )
            parsed.append((int(point[0]), float(point[1])))
        curves[kind] = sorted(parsed)
    return curves


def load_curves(path: str | Path) -> dict[str, Curve]:
    """Read and validate a curves.json file.

    Raises:
        UserError: the file is missing, not JSON, or not a curves record.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: pass a run directory the trainer finished writing.")
    from data.guard import read_json

    return parse_curves(read_json(path, "re-run the trainer."), origin=str(path))


def curves_title(model: str | None, dataset: str | None, verdict: str) -> str:
    """The LoRA-vs-FullFT chart's title: the model, the data and the regret verdict (its first word)."""
    return (f"{model or 'unknown model'} on {dataset or 'unknown data'}: LoRA vs FullFT, {verdict.split(':')[0]}\n"
            "held-out (bold) and training (faint) loss")


def curve_styles(methods: dict[str, str | None]) -> dict[str, tuple[str, str]]:
    """label -> (colour, line style): the colour is the run's method's (planner.report_charts), the
    same in every chart; further runs of one method keep its colour and change line style."""
    from planner.report_charts import LINE_STYLES, method_colour

    seen: dict[str | None, int] = {}
    styles = {}
    for label, method in methods.items():
        k = seen[method] = seen.get(method, -1) + 1
        styles[label] = (method_colour(method), LINE_STYLES[k % len(LINE_STYLES)])
    return styles


def plot_curves(
    runs: dict[str, dict[str, Curve]],
    path: str | Path,
    *,
    methods: dict[str, str | None],
    base_loss: float | None = None,
    title: str = "Held-out and training loss",
) -> Path:
    """Draw every run's loss against training step (log axis, plain tick labels) into one PNG.

    Train curves are faint, eval curves bold and marked, one colour per method (`curve_styles`).
    Step 0 cannot sit on a log axis, so step-0 points are left out; the base model's loss (which is
    what step 0 measures) is drawn as a dashed horizontal line when `base_loss` is given.
    Non-finite losses (a diverged run) are left out of the lines.

    Args:
        runs: label -> curves record (as from `load_curves`).
        path: where to write the PNG; parent directories are created.
        methods: label -> the run's training method (`lora`, `full`; None if unknown).
        base_loss: the base model's held-out loss in nats per token, or None.
        title: chart title: say which model, data and verdict it shows.

    Returns:
        The path written.
    """
    from planner.report_charts import finish_chart, plain_log_axis, pyplot

    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = curve_styles({label: methods.get(label) for label in runs})
    drawn = 0
    for label, curves in runs.items():
        colour, style = styles[label]
        for kind in CURVE_KINDS:
            points = [(s, v) for s, v in curves.get(kind, []) if s > 0 and math.isfinite(v)]
            if not points:
                continue
            steps, losses = zip(*points, strict=True)
            if kind == "train":
                ax.plot(steps, losses, color=colour, linestyle=style, alpha=0.3, linewidth=1, label=f"{label} train")
            else:
                ax.plot(steps, losses, color=colour, linestyle=style, linewidth=2.2, marker="o", markersize=4,
                        label=f"{label} eval")
            drawn += 1
    if base_loss is not None:
        ax.axhline(base_loss, color="grey", linestyle="--", linewidth=1, label="base model (eval)")
    if drawn:
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis)
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel("loss (nats per completion token)")
    finish_chart(fig, ax, title, path, dpi=120)
    return path
