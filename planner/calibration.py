"""Constants the planner took from our own study runs, with their provenance, beside the priors.

`planner/calibration.json` (package data) is written only by `lowregret study --calibrate` from the
study's finished runs (`study.calibrate.write_calibration`), never by hand. Each measured constant
names the literature prior it replaces, how it was measured, the run ids it came from, and the
file's provenance says when, on which commit and device, and by which command.

A constant whose measurement failed (the study could not fit it) is stored with `value: null`, and
the planner then uses the prior and says so. Pure: json and pathlib only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data.errors import UserError

CALIBRATION_FILE = Path(__file__).resolve().parent / "calibration.json"
SCHEMA_VERSION = 1
# The constants the study measures; each maps to the prior it stands in for (planner.capacity,
# planner.advice).
CALIBRATED_CONSTANTS = ("bits_per_param", "short_run_lora_over_fullft_lr")


@dataclass(frozen=True)
class Constant:
    """One constant as the planner uses it.

    Attributes:
        name: e.g. "bits_per_param".
        value: the value the planner uses (the measurement when there is one, else the prior).
        measured: True when `value` is our measurement, False when it is the literature prior.
        prior: the literature prior, always kept for display.
        prior_source: where the prior comes from.
        measured_value: the study's measurement, or None when the study could not fit it.
        source: one line saying where `value` comes from.
    """

    name: str
    value: float
    measured: bool
    prior: float
    prior_source: str
    measured_value: float | None
    source: str

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "measured": self.measured, "prior": self.prior,
                "prior_source": self.prior_source, "measured_value": self.measured_value, "source": self.source}


def _check(data: dict, path: Path) -> None:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        raise UserError(f"{path} is not a version-{SCHEMA_VERSION} calibration file: regenerate it with "
                        "`lowregret study --calibrate`.")
    for key in ("date", "commit", "device", "command"):
        if key not in data.get("provenance", {}):
            raise UserError(f"{path} has no provenance.{key}: regenerate it with `lowregret study --calibrate`.")
    constants = data.get("constants", {})
    for name in CALIBRATED_CONSTANTS:
        entry = constants.get(name)
        if not isinstance(entry, dict) or not {"value", "prior", "prior_source", "runs", "method"} <= set(entry):
            raise UserError(f"{path}: constant {name!r} lacks value, prior, prior_source, method or runs: "
                            "regenerate it with `lowregret study --calibrate`.")


def load_calibration(path: str | Path | None = None) -> dict | None:
    """The calibration record (see the module docstring), or None when the file does not exist.

    Raises:
        UserError: the file exists but is malformed or lacks provenance.
    """
    path = Path(path) if path is not None else CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc}): regenerate it with `lowregret study --calibrate`.") from exc
    _check(data, path)
    return data


def constant(name: str, prior: float, prior_source: str, calibration: dict | None = None) -> Constant:
    """The value to use for `name`: the study's measurement when it has one, else `prior`.

    Args:
        name: one of CALIBRATED_CONSTANTS.
        prior, prior_source: the literature prior and its citation (the caller's module owns them).
        calibration: a record from `load_calibration()`; None reads the packaged file.
    """
    if name not in CALIBRATED_CONSTANTS:
        raise ValueError(f"{name!r} is not a calibrated constant ({', '.join(CALIBRATED_CONSTANTS)})")
    record = calibration if calibration is not None else load_calibration()
    entry = (record or {}).get("constants", {}).get(name) or {}
    measured = entry.get("value")
    if measured is None:
        why = "no calibration file" if record is None else entry.get("why_not") or "not measured by the study"
        return Constant(name, prior, False, prior, prior_source, None, f"literature prior: {prior_source} ({why})")
    p = record["provenance"]
    source = (f"measured: {entry['method']} ({p['command']}, {p['date']}, commit {p['commit'][:10]}, "
              f"{p['device']}; {len(entry['runs'])} runs)")
    return Constant(name, float(measured), True, prior, prior_source, float(measured), source)
