"""planner/calibration.json from the study's results: the measured constants and their provenance.

Only `lowregret study --calibrate` writes the file (never a hand edit): `calibration_record(results)`
turns results.json into the record `planner.calibration` reads, so a test can regenerate it from
the committed docs/study/results.json and check that the packaged file says the same.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from planner import advice, calibration, capacity
from study import capacity as cap

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(command: str, started: float, scale: str, run_ids: list[str]) -> dict:
    """When, where and how the study ran: date (UTC), commit (with a dirty flag), device, command,
    the load average the CPU was under, and the run ids (run keys) behind every number."""
    import torch

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "dirty": None if status is None else bool(status),
        "device": f"{_cpu_model()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                  f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "command": command,
        "scale": scale,
        "load_average_at_analysis": [round(x, 2) for x in os.getloadavg()],
        "run_ids": sorted(set(run_ids)),
    }


# A run counts as converged when at most this share of its training-loss drop came in its last
# fifth of steps (study.analysis.late_drop).
LATE_DROP_CONVERGED = 0.05


def _unconverged(fit: dict, sizes: list[dict]) -> list[str]:
    """Labels of the capacity-bound runs of the fit that had not converged (or cannot tell)."""
    late = {r["run"]: r.get("late_drop") for s in sizes for r in s["ranks"]}
    return [p["label"] for p in fit["saturated"] if late.get(p["run"]) is None or late[p["run"]] > LATE_DROP_CONVERGED]


def calibration_record(results: dict) -> dict:
    """The planner/calibration.json record for a study's results.json (see planner.calibration)."""
    knee, lr = results.get("knee") or {}, results.get("lr") or {}
    fit = knee.get("fit")
    sizes = knee.get("sizes", [])
    lora_runs = sorted(r["run"] for s in sizes for r in s["ranks"])
    bits = {
        "value": fit["bits_per_param"] if fit else None,
        "prior": capacity.PRIOR_BITS_PER_PARAM, "prior_source": capacity.PRIOR_BITS_PER_PARAM_SOURCE,
        "method": (f"fit of facts stored = min(b × adapter params, FullFT's) over {len(lora_runs)} LoRA runs "
                   f"({', '.join(str(s['n_facts']) for s in sizes)} facts; study/capacity.py)"),
        "interval_leave_one_size_out": fit["interval"] if fit else None,
        "runs": lora_runs,
    }
    shortfalls = cap.short_of_fullft(fit["bits_per_param"], fit["runs"]) if fit else []
    if fit is None:
        bits["why_not"] = "no LoRA run of the study was capacity-bound, so the runs cannot tell b"
    elif shortfalls:
        # The fit's own model fails: adapters it says hold more than the data stored less than FullFT.
        bits["value"], bits["fit_not_used"] = None, fit["bits_per_param"]
        bits["why_not"] = (f"{len(shortfalls)} LoRA runs that the fit gives room to spare (b × params at least "
                           f"twice FullFT's stored bits) stored under 90% of FullFT's bits ("
                           + ", ".join(f"{p['label']}: {p['bits']:.0f} of {p['full_bits']:.0f}" for p in shortfalls)
                           + "): the runs were limited by their optimisation, not their adapter's size, so "
                           "the fitted b is a lower bound, not a measurement")
    else:
        unconverged = _unconverged(fit, sizes)
        if unconverged:
            # A run still learning at its end stored less than its adapter can hold: its bits/param
            # is a lower bound on b, not b. The fit stays in the record, unused by the planner.
            bits["value"], bits["fit_not_used"] = None, fit["bits_per_param"]
            bits["why_not"] = (f"{len(unconverged)} of the {len(fit['saturated'])} capacity-bound LoRA runs had not "
                               f"converged (more than {LATE_DROP_CONVERGED:.0%} of their loss drop came in their "
                               f"last fifth of steps: {', '.join(unconverged)}), so their bits/param bound b "
                               "from below and do not measure it")
    ratio = lr.get("ratio_geometric_mean")
    short = {
        "value": ratio,
        "prior": advice.SHORT_RUN_LORA_OVER_FULLFT_LR, "prior_source": advice.SHORT_RUN_PRIOR_SOURCE,
        "method": ("geometric mean of fitted LoRA optimum / FullFT optimum over corpora and ranks "
                   "(evaluation.sweep.fit_lr_sweep) for runs of "
                   f"{results.get('lr_steps', '?')} steps"),
        "ratios": lr.get("ratios", []),
        "runs": sorted(run for c in lr.get("corpora", {}).values() for run in c["runs"]),
    }
    if ratio is None:
        short["why_not"] = "no corpus had an in-range optimum for both FullFT and a LoRA rank"
    p = results["provenance"]
    return {
        "schema": calibration.SCHEMA_VERSION,
        "provenance": {k: p[k] for k in ("date", "commit", "dirty", "device", "command", "scale",
                                         "load_average_at_analysis")}
        | {"run_ids": sorted(set(bits["runs"]) | set(short["runs"]))}
        | ({"trained_by": p["trained_by"]} if p.get("trained_by") else {}),
        "constants": {"bits_per_param": bits, "short_run_lora_over_fullft_lr": short},
    }


def write_calibration_file(record: dict, path: str | Path) -> str:
    """Write the record as JSON (atomically: a temporary sibling renamed into place)."""
    from data.atomic import write_json

    return str(write_json(path, record, indent=2))
