"""The packaged planner/calibration.json is what `lowregret study --calibrate` makes of the committed
study results (docs/study/results.json), and the plan uses exactly what the file says."""

import json
from pathlib import Path

import pytest

from planner import advice, capacity
from planner.calibration import CALIBRATION_FILE, load_calibration
from planner.plan import build_plan
from study.calibrate import calibration_record
from tests.planner.fakes import FakeProfile

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "study" / "results.json"


def test_the_packaged_calibration_is_regenerated_from_the_committed_results():
    results = json.loads(RESULTS.read_text())
    record = load_calibration()  # schema and provenance checked by the planner's own loader
    assert record == calibration_record(results), f"{CALIBRATION_FILE} is not `lowregret study --calibrate`'s output"
    provenance = record["provenance"]
    assert provenance["scale"] == "full" and provenance["command"].startswith("lowregret study")
    every_run = set(results["provenance"]["run_ids"])
    for entry in record["constants"].values():
        assert entry["runs"] and set(entry["runs"]) <= set(provenance["run_ids"]) <= every_run


def test_the_plan_uses_the_packaged_calibration_and_shows_the_prior_beside_it():
    record = load_calibration()
    bits, ratio = (record["constants"][k]["value"] for k in ("bits_per_param", "short_run_lora_over_fullft_lr"))
    profile = FakeProfile(information_bits=4_000_000, completion_tokens=1_000_000, examples=1000)
    plan = build_plan("Llama-3.1-8B", 1, profile=profile, fullft_lr=1e-4, steps=20)  # the packaged file
    used = {c["name"]: c for c in plan.constants}
    assert used["bits_per_param"]["prior"] == capacity.PRIOR_BITS_PER_PARAM
    assert used["short_run_lora_over_fullft_lr"]["prior"] == advice.SHORT_RUN_LORA_OVER_FULLFT_LR
    if bits is None:
        assert plan.capacity.bits_per_param == capacity.PRIOR_BITS_PER_PARAM
        assert used["bits_per_param"]["source"].startswith("literature prior")
    else:
        assert plan.capacity.bits_per_param == bits and used["bits_per_param"]["source"].startswith("measured")
        assert plan.capacity.capacity_bits == pytest.approx(bits * plan.capacity.adapter_params)
    if ratio is None:
        assert plan.advice.lr_multiplier == advice.SHORT_RUN_LORA_OVER_FULLFT_LR and plan.advice.anecdotal
    else:
        assert plan.advice.lr_multiplier == ratio and not plan.advice.anecdotal
        assert used["short_run_lora_over_fullft_lr"]["source"].startswith("measured")


def _results(late_drops: dict, ratio=8.0) -> dict:
    """A results.json with one size, two LoRA runs of which `late_drops` names the capacity-bound."""
    ranks = [{"run": run, "late_drop": late} for run, late in late_drops.items()]
    saturated = [{"label": f"n64-{run}", "run": run, "params": 2048, "bits": 100.0, "full_bits": 300.0}
                 for run in late_drops]
    return {"knee": {"sizes": [{"n_facts": 64, "ranks": ranks}],
                     "fit": {"bits_per_param": 0.05, "interval": None, "saturated": saturated, "runs": saturated}},
            "lr": {"ratio_geometric_mean": ratio, "ratios": [ratio], "corpora": {"pydoc": {"runs": ["x", "y"]}}},
            "lr_steps": 8,
            "provenance": {"date": "2026-11-29T21:00:00Z", "commit": "0" * 40, "dirty": False, "device": "cpu",
                           "command": "lowregret study --calibrate", "scale": "full",
                           "load_average_at_analysis": [1.0, 1.0, 1.0], "run_ids": ["a", "b", "x", "y"]}}


def test_bits_per_param_is_calibrated_only_from_converged_capacity_bound_runs():
    converged = calibration_record(_results({"a": 0.01, "b": 0.04}))
    assert converged["constants"]["bits_per_param"]["value"] == 0.05
    assert "why_not" not in converged["constants"]["bits_per_param"]
    assert converged["provenance"]["run_ids"] == ["a", "b", "x", "y"]
    still_learning = calibration_record(_results({"a": 0.01, "b": 0.2}))["constants"]["bits_per_param"]
    assert still_learning["value"] is None and still_learning["fit_not_used"] == 0.05
    assert "1 of the 2" in still_learning["why_not"] and "n64-b" in still_learning["why_not"]
    unknown = calibration_record(_results({"a": None}))["constants"]["bits_per_param"]  # too few steps to tell
    assert unknown["value"] is None
    assert calibration_record(_results({"a": 0.0}, ratio=None))["constants"]["short_run_lora_over_fullft_lr"][
        "why_not"]


def test_bits_per_param_is_not_calibrated_when_runs_with_room_to_spare_fall_short_of_fullft():
    results = _results({"a": 0.01, "b": 0.01})
    roomy = {"label": "n64-r32", "run": "c", "params": 65536, "full_bits": 300.0}  # b × params = 3,277 bits
    results["knee"]["fit"]["runs"] = [*results["knee"]["fit"]["saturated"], roomy | {"bits": 290.0}]
    assert calibration_record(results)["constants"]["bits_per_param"]["value"] == 0.05  # 97% of FullFT's
    results["knee"]["fit"]["runs"][-1] = roomy | {"bits": 225.0}
    bits = calibration_record(results)["constants"]["bits_per_param"]
    assert bits["value"] is None and bits["fit_not_used"] == 0.05
    assert "n64-r32: 225 of 300" in bits["why_not"] and "lower bound" in bits["why_not"]
