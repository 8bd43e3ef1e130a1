"""planner.calibration: measured constants with provenance, used by the verdict and the LR advice."""

import json

import pytest

from data.errors import UserError
from planner import advice, calibration, capacity
from planner.calibration import constant, load_calibration
from planner.plan import build_plan
from tests.planner.fakes import FakeProfile


def _record(bits=0.75, ratio=6.0):
    entry = {"prior": 0, "prior_source": "x", "method": "study", "runs": ["a", "b"]}
    return {"schema": calibration.SCHEMA_VERSION,
            "provenance": {"date": "2026-12-01T00:00:00Z", "commit": "0123456789abcdef", "device": "cpu",
                           "command": "lowregret study --calibrate"},
            "constants": {"bits_per_param": entry | {"value": bits},
                          "short_run_lora_over_fullft_lr": entry | {"value": ratio}}}


def test_measured_constants_replace_the_priors_and_say_so():
    record = _record()
    bits = constant("bits_per_param", 2.0, "Allen-Zhu & Li", record)
    assert (bits.value, bits.measured, bits.prior, bits.measured_value) == (0.75, True, 2.0, 0.75)
    assert bits.source.startswith("measured: study (lowregret study --calibrate, 2026-12-01") and "2 runs" in bits.source


def test_a_constant_the_study_could_not_measure_falls_back_to_its_prior():
    record = _record(bits=None)
    record["constants"]["bits_per_param"]["why_not"] = "no capacity-bound run"
    bits = constant("bits_per_param", 2.0, "Allen-Zhu & Li", record)
    assert (bits.value, bits.measured) == (2.0, False)
    assert "literature prior" in bits.source and "no capacity-bound run" in bits.source
    prior = constant("bits_per_param", 2.0, "Allen-Zhu & Li", {})
    assert (prior.value, prior.measured) == (2.0, False)


def test_the_plan_uses_and_shows_the_calibrated_constants():
    record = _record(bits=0.5, ratio=6.0)
    profile = FakeProfile(information_bits=4_000_000, completion_tokens=1_000_000, examples=1000)
    plan = build_plan("Llama-3.1-8B", 1, profile=profile, fullft_lr=1e-4, steps=20, calibration=record)
    c = plan.capacity
    # 2,621,440 adapter params at rank 1 (DESIGN.md): × 0.5 = 1.31M bits < 4M → capacity-constrained;
    # under the 2 bits/param prior 5.24M bits ≥ 4M → borderline.
    assert (c.bits_per_param, c.capacity_bits, c.verdict) == (0.5, 1_310_720, "capacity-constrained")
    assert (c.prior_bits_per_param, c.prior_verdict) == (2.0, "borderline")
    assert c.bits_per_param_source.startswith("measured:")
    assert c.min_rank_pow2 == 8 and c.prior_min_rank_pow2 == 2  # 2×4M/0.5 = 16M params; 2×4M/2 = 4M
    assert plan.advice.lr_multiplier == 6.0 and plan.advice.lora_lr == pytest.approx(6e-4)
    assert not plan.advice.anecdotal and plan.advice.prior_lr_multiplier == 15.0
    used = {c["name"]: c for c in plan.constants}
    assert used["bits_per_param"]["value"] == 0.5 and used["bits_per_param"]["prior"] == 2.0
    assert used["short_run_lora_over_fullft_lr"]["value"] == 6.0 and used["short_run_lora_over_fullft_lr"]["prior"] == 15.0
    # A long run keeps the 10x prior: the study measured short runs only.
    long = build_plan("Llama-3.1-8B", 1, profile=profile, fullft_lr=1e-4, steps=1000, calibration=record)
    assert long.advice.lr_multiplier == advice.LORA_OVER_FULLFT_LR
    # An explicit --bits-per-param wins over the calibration.
    given = build_plan("Llama-3.1-8B", 1, profile=profile, bits_per_param=2.0, fullft_lr=1e-4, calibration=record)
    assert given.capacity.bits_per_param == 2.0 and "given" in given.capacity.bits_per_param_source


def test_priors_only_when_asked():
    profile = FakeProfile(information_bits=4_000_000, completion_tokens=1_000_000)
    plan = build_plan("Llama-3.1-8B", 1, profile=profile, fullft_lr=1e-4, steps=20, calibration={})
    assert plan.capacity.bits_per_param == capacity.PRIOR_BITS_PER_PARAM
    assert plan.advice.lr_multiplier == advice.SHORT_RUN_LORA_OVER_FULLFT_LR and plan.advice.anecdotal


def test_load_checks_schema_and_provenance(tmp_path):
    assert load_calibration(tmp_path / "absent.json") is None
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_record()))
    assert load_calibration(path)["constants"]["bits_per_param"]["value"] == 0.75
    broken = _record()
    del broken["provenance"]["commit"]
    path.write_text(json.dumps(broken))
    with pytest.raises(UserError, match="provenance.commit"):
        load_calibration(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        load_calibration(path)
