"""Regret, relative regret, recovered fraction and the verdict, checked against hand numbers."""

import json

import pytest

from evaluation.compare import RegretThreshold, compare, compare_runs, load_run, matched_points
from planner.errors import UserError


def curves(eval_points, train_points=()):
    return {"train": list(train_points), "eval": list(eval_points)}


LORA = curves([(0, 2.0), (10, 1.5), (100, 1.21), (200, 1.10)])
FULL = curves([(0, 2.0), (10, 1.4), (100, 1.20), (300, 1.00)])


def test_final_regret_and_recovered_by_hand():
    c = compare(LORA, FULL, lora_final=1.03, full_final=1.00)
    assert c.regret_nats == pytest.approx(0.03)
    assert c.regret_relative == pytest.approx(0.03)
    # base 2.0 from the shared step-0 point: (2.0 - 1.03) / (2.0 - 1.00) = 0.97
    assert c.base_loss == pytest.approx(2.0)
    assert c.recovered_fraction == pytest.approx(0.97)
    # default: max(1% of 1.00, 0.01) = 0.01 allowed; 0.03 fails
    assert c.allowed_regret_nats == pytest.approx(0.01)
    assert not c.passed
    assert c.verdict.startswith("FAIL")


def test_matched_steps_only_common_steps_above_zero():
    points = matched_points(LORA["eval"], FULL["eval"])
    assert [p.step for p in points] == [10, 100]
    assert points[0].regret_nats == pytest.approx(0.1)
    assert points[0].regret_relative == pytest.approx(0.1 / 1.4)
    assert points[1].regret_nats == pytest.approx(0.01)
    c = compare(LORA, FULL)
    assert c.worst_matched.step == 10


def test_finals_default_to_last_eval_point():
    c = compare(LORA, FULL)
    assert (c.lora_final, c.full_final) == (1.10, 1.00)
    assert c.regret_nats == pytest.approx(0.10)


@pytest.mark.parametrize(
    "lora, full, threshold, passed",
    [
        (1.009, 1.0, RegretThreshold(0.01, 0.0), True),  # 0.9% <= 1%
        (1.011, 1.0, RegretThreshold(0.01, 0.0), False),  # 1.1% > 1%
        (0.104, 0.1, RegretThreshold(0.01, 0.005), True),  # 4% relative but under the 0.005 floor
        (0.106, 0.1, RegretThreshold(0.01, 0.005), False),  # over both
        (0.9, 1.0, RegretThreshold(0.0, 0.0), True),  # LoRA better: negative regret passes
        (1.04, 1.0, 0.05, True),  # a float is a relative threshold
        (1.06, 1.0, 0.05, False),
    ],
)
def test_threshold(lora, full, threshold, passed):
    c = compare(curves([]), curves([]), lora_final=lora, full_final=full, threshold=threshold)
    assert c.passed is passed


def test_no_common_steps_and_no_base_are_noted():
    c = compare(curves([(5, 1.0)]), curves([(7, 1.0)]))
    assert c.matched == ()
    assert c.base_loss is None and c.recovered_fraction is None
    assert any("No eval step" in n for n in c.notes)


def test_step0_disagreement_is_flagged_not_used():
    c = compare(curves([(0, 2.0), (5, 1.0)]), curves([(0, 2.5), (5, 1.0)]))
    assert c.base_loss is None
    assert any("different held-out" in n for n in c.notes)


def test_explicit_base_loss_and_fullft_that_learned_nothing():
    c = compare(curves([]), curves([]), lora_final=1.5, full_final=1.0, base_loss=3.0)
    assert c.recovered_fraction == pytest.approx(0.75)
    c = compare(curves([]), curves([]), lora_final=1.5, full_final=1.0, base_loss=0.9)
    assert c.recovered_fraction is None


def test_missing_final_without_eval_curve_is_user_error():
    with pytest.raises(UserError, match="no final eval loss"):
        compare(curves([]), FULL)


def test_negative_threshold_rejected():
    with pytest.raises(UserError, match=">= 0"):
        RegretThreshold(relative=-0.1)


def test_to_dict_is_json_serialisable():
    record = compare(LORA, FULL).to_dict()
    again = json.loads(json.dumps(record))
    assert again["matched"][0]["step"] == 10
    assert again["worst_matched"]["step"] == 10
    assert again["threshold"] == {"relative": 0.01, "absolute_nats": 0.01}


def write_run(root, name, method, final, eval_points, **config):
    run = root / name
    run.mkdir()
    cfg = {
        "model": "m",
        "dataset": "d",
        "eval_dataset": None,
        "eval_fraction": 0.1,
        "seed": 0,
        "max_length": 64,
        "eval_max_examples": None,
        "method": method,
        **config,
    }
    (run / "summary.json").write_text(json.dumps({"method": method, "final_eval_loss": final, "config": cfg}))
    (run / "curves.json").write_text(json.dumps({"train": [[1, 3.0]], "eval": eval_points}))
    return run


def test_compare_runs_reads_output_dirs(tmp_path):
    lora = write_run(tmp_path, "lora", "lora", 1.005, [[0, 2.0], [10, 1.2]])
    full = write_run(tmp_path, "full", "full", 1.0, [[0, 2.0], [10, 1.1]])
    c, lora_run, full_run = compare_runs(lora, full)
    assert c.lora_final == 1.005 and c.full_final == 1.0
    assert c.passed
    assert c.base_loss == 2.0
    assert lora_run.method == "lora" and full_run.method == "full"


def test_compare_runs_rejects_swapped_methods(tmp_path):
    lora = write_run(tmp_path, "lora", "lora", 1.0, [])
    full = write_run(tmp_path, "full", "full", 1.0, [])
    with pytest.raises(UserError, match="swap them"):
        compare_runs(full, lora)


def test_two_runs_of_one_method_measure_noise(tmp_path):
    a = write_run(tmp_path, "full-a", "full", 1.003, [])
    b = write_run(tmp_path, "full-b", "full", 1.0, [])
    c, _, _ = compare_runs(a, b)
    assert c.regret_nats == pytest.approx(0.003)
    assert any("run-to-run noise" in n for n in c.notes)


def test_compare_runs_rejects_different_held_out_sets(tmp_path):
    lora = write_run(tmp_path, "lora", "lora", 1.0, [], eval_fraction=0.2)
    full = write_run(tmp_path, "full", "full", 1.0, [])
    with pytest.raises(UserError, match="eval_fraction"):
        compare_runs(lora, full)
    c, _, _ = compare_runs(lora, full, allow_mismatch=True)
    assert any("eval_fraction" in n for n in c.notes)


def test_seed_does_not_matter_with_a_separate_eval_set(tmp_path):
    lora = write_run(tmp_path, "lora", "lora", 1.0, [], eval_dataset="e.jsonl", seed=1)
    full = write_run(tmp_path, "full", "full", 1.0, [], eval_dataset="e.jsonl", seed=2)
    compare_runs(lora, full)


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: None, "not found"),
        (lambda p: p.mkdir(), "no summary.json"),
        (lambda p: (p.mkdir(), (p / "summary.json").write_text("{")), "not valid JSON"),
        (lambda p: (p.mkdir(), (p / "summary.json").write_text("{}")), "no curves.json"),
        (
            lambda p: (
                p.mkdir(),
                (p / "summary.json").write_text("{}"),
                (p / "curves.json").write_text('{"eval": [[1]]}'),
            ),
            r"\[step, loss\]",
        ),
    ],
)
def test_bad_run_dirs_are_user_errors(tmp_path, setup, match):
    run = tmp_path / "run"
    setup(run)
    with pytest.raises(UserError, match=match):
        load_run(run)
