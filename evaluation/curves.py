"""Learning curves: read a run's curves.json and draw every run's loss on one log-step chart.

A curves record is the trainer's `curves.json` (docs/ARCHITECTURE.md, "Trainer"):
`{"train": [[step, loss], ...], "eval": [[step, loss], ...]}`, losses in nats per completion token.
matplotlib is imported inside `plot_curves`, so importing this module stays light.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

from planner.errors import UserError

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
        parsed = []
        for point in points:
            if (
                not isinstance(point, (list, tuple))
                or len(point) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)
            ):
                raise UserError(
                    f"{origin}: {kind!r} holds {point!r}; each point must be [step, loss]. "
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
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-run the trainer.") from exc
    return parse_curves(record, origin=str(path))


def plot_curves(
    runs: dict[str, dict[str, Curve]],
    path: str | Path,
    *,
    base_loss: float | None = None,
    title: str = "Held-out and training loss",
) -> Path:
    """Draw every run's loss against training step (log axis) into one PNG.

    Train curves are faint, eval curves bold and marked, one colour per run. Step 0 cannot sit on
    a log axis, so step-0 points are left out; the base model's loss (which is what step 0 measures)
    is drawn as a dashed horizontal line when `base_loss` is given. Non-finite losses (a diverged
    run) are left out of the lines.

    Args:
        runs: label -> curves record (as from `load_curves`).
        path: where to write the PNG; parent directories are created.
        base_loss: the base model's held-out loss in nats per token, or None.
        title: chart title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = 0
    for i, (label, curves) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        for kind in CURVE_KINDS:
            points = [(s, v) for s, v in curves.get(kind, []) if s > 0 and math.isfinite(v)]
            if not points:
                continue
            steps, losses = zip(*points, strict=True)
            if kind == "train":
                ax.plot(steps, losses, color=colour, alpha=0.3, linewidth=1, label=f"{label} train")
            else:
                ax.plot(
                    steps,
                    losses,
                    color=colour,
                    linewidth=2.2,
                    marker="o",
                    markersize=4,
                    label=f"{label} eval",
                )
            drawn += 1
    if base_loss is not None:
        ax.axhline(base_loss, color="grey", linestyle="--", linewidth=1, label="base model (eval)")
    if drawn:
        ax.set_xscale("log")
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel("loss (nats per completion token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    # Written beside and renamed: a reader (or a pipeline drawing the same chart) never sees half a PNG.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}{path.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
