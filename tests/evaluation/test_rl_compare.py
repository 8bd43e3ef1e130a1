"""RL reward regret: paired over prompts, three-way verdict, refusals; runs written by hand (no training)."""

import json
import math
from pathlib import Path

import pytest

from data.errors import UserError
from evaluation.rl import compare_rl_runs
from evaluation.runs import load_run
from flows.cli import main
from trainer.result import EVAL_SCORES_FILE, RL, scores_record


def write_run(root: Path, name: str, method: str, final: list[float], *, base: list[float] | None = None,
              prompt_ids: list[str] | None = None, **config) -> Path:
    """An RL run folder as trainer/rl.py writes it: step-0 (base) and final greedy rewards per prompt."""
    run = root / name
    run.mkdir(parents=True)
    base = base if base is not None else [0.0] * len(final)
    ids = prompt_ids or [f"p{i}" for i in range(len(final))]
    settings = {"model": "tiny", "reward": "exact", "max_new_tokens": 4, "rank": 1, "method": method} | config
    (run / "summary.json").write_text(json.dumps({"method": method, "config": settings, "data_fingerprint": "d1"}))
    mean = sum(final) / len(final)
    (run / "curves.json").write_text(json.dumps({"train_reward": [[1, 0.1], [2, mean]],
                                                 "eval_accuracy": [[0, sum(base) / len(base)], [2, mean]]}))
    (run / EVAL_SCORES_FILE).write_text(json.dumps(scores_record(RL, ids, [1.0] * len(ids), [[0, base], [2, final]])))
    return run


def test_identical_rewards_pass(tmp_path):
    rewards = [1.0] * 120 + [0.0] * 80
    c = compare_rl_runs(write_run(tmp_path, "l", "lora", rewards), write_run(tmp_path, "f", "full", rewards))
    assert (c.regret, c.low, c.high, c.verdict, c.passed) == (0.0, 0.0, 0.0, "PASS", True)
    assert (c.lora_accuracy, c.full_accuracy, c.base_accuracy, c.prompts) == (0.6, 0.6, 0.0, 200)
    assert c.recovered == 1.0 and c.matched == ((2, 0.6, 0.6),)


def test_lora_far_behind_fails(tmp_path):
    c = compare_rl_runs(write_run(tmp_path, "l", "lora", [0.0] * 100), write_run(tmp_path, "f", "full", [1.0] * 100))
    assert (c.regret, c.verdict) == (1.0, "FAIL") and c.low > c.allowed_regret
    assert c.recovered == 0.0


def test_a_small_gap_on_few_prompts_is_inconclusive_and_says_how_many_would_decide(tmp_path):
    # 10 prompts only FullFT solves, 5 only LoRA solves: regret +0.05 on 100 prompts.
    full = [1.0] * 60 + [0.0] * 40
    lora = [1.0] * 50 + [0.0] * 10 + [1.0] * 5 + [0.0] * 35
    c = compare_rl_runs(write_run(tmp_path, "l", "lora", lora), write_run(tmp_path, "f", "full", full),
                        allowed_regret=0.1)
    assert c.regret == pytest.approx(0.05)
    assert c.low < 0.05 < c.high and c.verdict == "INCONCLUSIVE"
    assert c.prompts_needed is not None and c.prompts_needed > 100
    assert c.recovered == pytest.approx(55 / 60)
    assert f"About {c.prompts_needed} held-out prompts" in c.message


@pytest.mark.parametrize("change, says", [
    ("same", "given twice"),
    ("methods", "is a 'full' run, not a 'lora' run"),
    ("prompts", "different held-out prompts"),
    ("reward", "different rewards"),
    ("model", "different base models"),
])
def test_refuses_what_is_not_a_comparison(tmp_path, change, says):
    rewards = [1.0, 0.0, 1.0]
    full = write_run(tmp_path, "f", "full", rewards)
    lora = {
        "same": lambda: full,
        "methods": lambda: write_run(tmp_path, "l", "full", rewards),
        "prompts": lambda: write_run(tmp_path, "l", "lora", rewards, prompt_ids=["x", "y", "z"]),
        "reward": lambda: write_run(tmp_path, "l", "lora", rewards, reward=r"regex:\d+"),
        "model": lambda: write_run(tmp_path, "l", "lora", rewards, model="other"),
    }[change]()
    with pytest.raises(UserError, match=says):
        compare_rl_runs(lora, full)


def test_an_unfinished_or_broken_run_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a finished RL run"):
        load_run(tmp_path, RL)
    run = write_run(tmp_path, "r", "lora", [1.0, 0.0])
    (run / EVAL_SCORES_FILE).write_text(json.dumps(scores_record(RL, ["a"], [1.0], [[0, [1.0, 0.0]]])))
    with pytest.raises(UserError, match="inconsistent"):
        load_run(run, RL)


@pytest.mark.parametrize("final, code, verdict", [([1.0] * 50, 0, "PASS"), ([0.0] * 50, 1, "FAIL")])
def test_cli_table_exit_code_and_chart(tmp_path, capsys, final, code, verdict):
    lora, full = write_run(tmp_path, "l", "lora", final), write_run(tmp_path, "f", "full", [1.0] * 50)
    chart = tmp_path / "rewards.png"
    assert main(["rl-compare", "--lora", str(lora), "--full", str(full), "--chart", str(chart), "--exit-code"]) == code
    out = capsys.readouterr().out
    assert "held-out reward" in out and f"{verdict}: LoRA's held-out reward trails" in out
    assert chart.stat().st_size > 10_000
    assert main(["rl-compare", "--lora", str(lora), "--full", str(full), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == verdict
    assert main(["rl-compare", "--lora", str(full), "--full", str(lora)]) == 2  # swapped: refused


@pytest.mark.parametrize("case, says", [
    ("missing", "not a finished RL run"),
    ("unfinished", "no summary.json"),
    ("supervised", "not a finished RL run"),
    ("allowed", "must be >= 0"),
])
def test_cli_bad_input_exits_2_and_writes_no_chart(tmp_path, capsys, case, says):
    full = write_run(tmp_path, "f", "full", [1.0, 0.0, 1.0])
    lora = write_run(tmp_path, "l", "lora", [1.0, 0.0, 0.0])
    extra = []
    if case == "missing":
        lora = tmp_path / "nope"
    elif case == "unfinished":  # what a stopped rl-train leaves: curves and rewards so far, no summary
        (lora / "summary.json").unlink()
    elif case == "supervised":  # an SFT run's files
        lora = tmp_path / "sft"
        lora.mkdir()
        (lora / "summary.json").write_text(json.dumps({"method": "lora"}))
        (lora / "curves.json").write_text(json.dumps({"train": [[1, 2.0]], "eval": [[0, 2.1], [1, 2.0]]}))
    else:
        extra = ["--allowed-regret", "-1"]
    chart = tmp_path / "charts" / "rewards.png"
    assert main(["rl-compare", "--lora", str(lora), "--full", str(full), "--chart", str(chart), *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not chart.parent.exists()


def test_an_unbounded_recovered_interval_is_said_in_words(tmp_path):
    from evaluation.rl import format_comparison

    full = [1.0] + [0.0] * 39  # FullFT gains one prompt: many resamples hold no gain at all
    c = compare_rl_runs(write_run(tmp_path, "l", "lora", full), write_run(tmp_path, "f", "full", full))
    assert c.recovered == 1.0 and not math.isfinite(c.recovered_high)
    assert "interval unbounded" in format_comparison(c) and "inf" not in format_comparison(c)
