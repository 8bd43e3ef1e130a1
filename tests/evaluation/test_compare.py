"""compare: verdicts on constructed per-example losses, matched steps, hints from what was run, and
the refusals of what is not a comparison."""

import json

import numpy as np
import pytest

from data.errors import UserError
from evaluation.compare import (
    HeldOutLosses,
    RegretThreshold,
    RunFacts,
    compare,
    compare_runs,
    matched_points,
)
from evaluation.runs import load_run
from trainer.result import EVAL_SCORES_FILE, SUPERVISED, scores_record

N, TOKENS = 300, 10


def held_out(regret_per_token, spread=0.2, seeds=1, base=3.0):
    """FullFT at 2.0 nats/token on every example; LoRA worse by regret_per_token ± spread (alternating)."""
    full = np.full(N, 2.0 * TOKENS)
    diff = np.where(np.arange(N) % 2 == 0, 1, -1) * spread * TOKENS + regret_per_token * TOKENS
    return HeldOutLosses(tokens=(TOKENS,) * N, lora=(tuple(full + diff),) * seeds, full=(tuple(full),) * seeds,
                         base=tuple(np.full(N, base * TOKENS)))


@pytest.mark.parametrize(
    "regret, threshold, verdict, exit_code",
    [
        (0.0, RegretThreshold(0.01, 0.01), "PASS", 0),  # 0 ± 0.023 within 0.02 ... (allowed = 2% of 2.0)
        (0.1, RegretThreshold(0.01, 0.01), "FAIL", 1),  # 0.1 ± 0.023 entirely above 0.02
        (0.02, RegretThreshold(0.01, 0.01), "INCONCLUSIVE", 3),  # on the threshold
        (-0.5, RegretThreshold(0.0, 0.0), "PASS", 0),  # LoRA better passes any threshold
    ],
)
def test_three_way_verdict(regret, threshold, verdict, exit_code):
    c = compare(held_out(regret, spread=0.2 if regret != 0 else 0.05), threshold=threshold)
    assert c.regret_nats == pytest.approx(regret)
    assert c.lora_final == pytest.approx(2.0 + regret) and c.full_final == pytest.approx(2.0)
    assert c.allowed_regret_nats == pytest.approx(max(threshold.relative * 2.0, threshold.absolute_nats))
    assert c.verdict == verdict and c.exit_code == exit_code and c.passed is (verdict == "PASS")
    assert c.regret_low <= c.regret_nats <= c.regret_high
    assert c.message.startswith(verdict)


def test_inconclusive_message_names_the_examples_needed():
    c = compare(held_out(0.015, spread=0.2))  # allowed 0.02, margin 0.005, half-width ~0.023
    assert c.verdict == "INCONCLUSIVE" and c.examples_needed > N
    assert f"about {c.examples_needed:,} held-out examples would likely decide it (this comparison had {N})" in c.message


def test_recovered_and_base_from_the_per_example_losses():
    c = compare(held_out(0.25, spread=0.1))  # base 3.0, FullFT 2.0, LoRA 2.25: recovered 0.75
    assert c.base_loss == pytest.approx(3.0)
    assert c.recovered_fraction == pytest.approx(0.75)
    record = json.loads(json.dumps(c.to_dict()))
    assert record["verdict"] == "FAIL" and record["interval"]["recovered"] == pytest.approx(0.75)


def test_matched_steps_average_seeds_and_skip_step_zero():
    lora = [[(0, 3.0), (10, 2.5), (100, 2.1)], [(0, 3.0), (10, 2.7), (100, 2.1)]]
    full = [[(0, 3.0), (10, 2.4), (100, 2.0), (200, 1.9)], [(0, 3.0), (10, 2.4), (100, 2.0)]]
    points = matched_points(lora, full)
    assert [p.step for p in points] == [10, 100]
    assert points[0].regret_nats == pytest.approx(0.2) and points[1].regret_nats == pytest.approx(0.1)


def test_hints_come_from_what_was_run():
    offset = [[(0, 3.0), (1, 2.6), (16, 2.2)]], [[(0, 3.0), (1, 2.5), (16, 2.1)]]
    c = compare(held_out(0.1), lora_evals=offset[0], full_evals=offset[1],
                facts=RunFacts(lora_lr=1e-3, full_lr=1e-4, global_batch=4, steps=16, rank=16))
    text = "\n".join(c.hints)
    assert "hint (LR or steps): the gap was already +0.1000 at the first eval (step 1)" in text
    assert "hint (steps): 16 steps" in text
    assert "hint (LR)" not in text.replace("hint (LR or", "")  # 10x is within 1.5x of the advised 15x
    late = [[(0, 3.0), (10, 2.50), (1000, 2.1)]], [[(0, 3.0), (10, 2.49), (1000, 2.0)]]
    c = compare(held_out(0.1), lora_evals=late[0], full_evals=late[1],
                facts=RunFacts(lora_lr=1e-4, full_lr=1e-4, global_batch=64, steps=1000, rank=4))
    text = "\n".join(c.hints)
    assert "hint (capacity): the gap grew from +0.0100 (step 10) to +0.1000 (step 1000)" in text
    assert "try a higher rank than 4" in text
    assert "hint (LR): the LoRA LR was 1x FullFT's; the blog's optimum is ~10x" in text
    assert "hint (batch): global batch 64 > 32" in text
    assert compare(held_out(0.0, spread=0.01), facts=RunFacts(lora_lr=1e-4, full_lr=1e-4)).hints == ()


# ----------------------------------------------------------------------------- run directories


def write_run(root, name, method, nll, *, seed=0, ids=None, tokens=None, fingerprint="data-1", model="m",
              lr=None, base=None):
    """A finished run as the trainer writes it: summary.json, curves.json, eval_scores.json."""
    run = root / name
    run.mkdir()
    n = len(nll)
    tokens = tokens or [TOKENS] * n
    base = base if base is not None else [3.0 * t for t in tokens]
    final = sum(nll) / sum(tokens)
    config = {"model": model, "dataset": "d", "eval_fraction": 0.1, "seed": seed, "max_length": 64,
              "method": method, "rank": 4, "lr": lr or (1e-3 if method == "lora" else 1e-4)}
    summary = {"method": method, "final_eval_loss": final, "steps": 100, "global_batch": 8, "config": config,
               "data_fingerprint": fingerprint}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "curves.json").write_text(json.dumps({"train": [[1, 3.0]], "eval": [[0, 3.0], [100, final]]}))
    (run / EVAL_SCORES_FILE).write_text(json.dumps(
        scores_record(SUPERVISED, ids or [f"{i:016x}" for i in range(n)], tokens, [[0, base], [100, list(nll)]])))
    return run


def _losses(per_token, spread=0.05):
    return [(per_token + (spread if i % 2 else -spread)) * TOKENS for i in range(N)]


def test_compare_runs_reads_the_per_example_files(tmp_path):
    lora = write_run(tmp_path, "lora", "lora", _losses(2.005))
    full = write_run(tmp_path, "full", "full", _losses(2.0))
    c, lora_runs, full_runs = compare_runs(lora, full)
    assert c.regret_nats == pytest.approx(0.005) and c.verdict == "PASS"
    assert c.base_loss == pytest.approx(3.0) and c.recovered_fraction == pytest.approx(0.995)
    assert [p.step for p in c.matched] == [100]
    assert c.facts == RunFacts(lora_lr=1e-3, full_lr=1e-4, global_batch=8, steps=100, rank=4)
    assert (lora_runs[0].method, full_runs[0].method) == ("lora", "full")


def test_seed_replicates_pair_by_seed(tmp_path):
    loras = [write_run(tmp_path, f"lora-{s}", "lora", _losses(2.0 + r), seed=s) for s, r in ((1, 0.01), (0, 0.0))]
    fulls = [write_run(tmp_path, f"full-{s}", "full", _losses(2.0 + f), seed=s) for s, f in ((0, 0.0), (1, 0.002))]
    c, _, _ = compare_runs(loras, fulls)
    assert c.interval.seeds == 2
    assert c.interval.seed_regrets == pytest.approx((0.0, 0.008))
    assert c.interval.full_seed_sd == pytest.approx(0.002 / 2**0.5)


@pytest.mark.parametrize(
    "case, match",
    [
        ("itself", "given twice"),
        ("two lora", "is a 'lora' run, not a 'full' run"),
        ("two full", "is a 'full' run, not a 'lora' run"),
        ("swapped", "is a 'full' run, not a 'lora' run"),
        ("other held-out", "different held-out examples"),
        ("other data", "different data"),
        ("other model", "different base models"),
        ("no per-example file", "no eval_scores.json"),
        ("an RL run", "is a 'rl' run"),
        ("unpaired seeds", "pair up"),
    ],
)
def test_what_is_not_a_comparison_is_refused(tmp_path, case, match):
    lora = write_run(tmp_path, "lora", "lora", _losses(2.0))
    full = write_run(tmp_path, "full", "full", _losses(2.0))
    other = {
        "itself": lambda: (lora, lora),
        "two lora": lambda: (lora, write_run(tmp_path, "l2", "lora", _losses(2.0), seed=1)),
        "two full": lambda: (write_run(tmp_path, "f2", "full", _losses(2.0)), full),
        "swapped": lambda: (full, lora),
        "other held-out": lambda: (lora, write_run(tmp_path, "f2", "full", _losses(2.0), ids=[f"x{i}" for i in range(N)])),
        "other data": lambda: (lora, write_run(tmp_path, "f2", "full", _losses(2.0), fingerprint="data-2")),
        "other model": lambda: (lora, write_run(tmp_path, "f2", "full", _losses(2.0), model="other")),
        "no per-example file": lambda: (lora, full),
        "an RL run": lambda: (lora, full),
        "unpaired seeds": lambda: ([lora, write_run(tmp_path, "l2", "lora", _losses(2.0), seed=1)],
                                   [full, write_run(tmp_path, "f2", "full", _losses(2.0), seed=2)]),
    }
    args = other[case]()
    if case == "no per-example file":
        (full / EVAL_SCORES_FILE).unlink()
    if case == "an RL run":  # an RL run's score file given to `compare`
        record = json.loads((full / EVAL_SCORES_FILE).read_text())
        (full / EVAL_SCORES_FILE).write_text(json.dumps(record | {"objective": "rl"}))
    with pytest.raises(UserError, match=match):
        compare_runs(*args)


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


def test_negative_threshold_rejected():
    with pytest.raises(UserError, match=">= 0"):
        RegretThreshold(relative=-0.1)
