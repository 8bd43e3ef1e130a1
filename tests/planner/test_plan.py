"""build_plan: the JSON contract, bad input, and the verdict with a DatasetProfile-like input."""

import json

import pytest

from data.errors import UserError
from planner.plan import build_plan
from tests.planner.fakes import FakeProfile


def test_to_dict_is_json_with_adapter_params_on_top():
    plan = build_plan("meta-llama/Llama-3.1-8B", 1)
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["adapter_params"] == 2_621_440
    assert d["lora"]["by_role"] == {"attention": 851_968, "mlp": 1_769_472}
    for key in ("model", "rank", "targets", "expert_rank_divisor", "dataset", "capacity", "advice", "flops",
                "memory", "hardware", "constants", "notes", "rank_curve"):
        assert key in d
    assert d["rank_curve"][0] == [1, 2_621_440] and d["rank_curve"][-1] == [512, 512 * 2_621_440]
    assert all(c["source"] for c in d["constants"])


def test_plan_with_profile_has_verdict_steps_and_run():
    profile = FakeProfile(information_bits=1e8, completion_tokens=10**7, examples=6400, total_tokens=2 * 10**7)
    plan = build_plan("Qwen3-8B", 8, profile=profile, batch_size=32, epochs=2)
    assert plan.capacity.verdict == "capacity-constrained"  # 8 × per-rank params × 2 bits < 1e8
    assert plan.settings["steps"] == 2 * 6400 // 32
    assert plan.run.tokens == 4 * 10**7
    assert plan.to_dict()["dataset"]["information_bits"] == 1e8


def test_moe_plan_says_which_divisor():
    plan = build_plan("Qwen3-30B-A3B", 16, expert_rank_divisor="total")
    assert plan.lora.expert_rank == 1
    assert any("divisor 'total'" in note for note in plan.notes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank"),
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": -1}, "batch_size"),
        ({"mfu": 1.5}, "mfu"),
        ({"gpu": "B300"}, "Unknown GPU"),
        ({"model": "NoSuchModel-7B"}, "Unknown model"),
        ({"targets": "wq,wk"}, "No matrix named"),
        ({"expert_rank_divisor": "half"}, "divisor"),
    ],
)
def test_bad_input_is_user_error(kwargs, message):
    args = {"model": "Qwen3-8B", "rank": 8} | kwargs
    with pytest.raises(UserError, match=message):
        build_plan(args.pop("model"), args.pop("rank"), **args)


def test_build_plan_is_fast():
    import time

    start = time.perf_counter()
    build_plan("Qwen3-235B-A22B", 16, profile=FakeProfile(1e9, 10**9, examples=10**6, total_tokens=10**9))
    assert time.perf_counter() - start < 0.5
