"""`lowregret compare` end to end through the dispatcher, on run directories written here."""

import json
import subprocess
import sys

import pytest

from flows.cli import main
from trainer.result import EVAL_SCORES_FILE, SUPERVISED, scores_record

N, TOKENS = 200, 10


def write_run(root, name, method, per_token, eval_points, spread=0.05):
    """A finished run with per-example held-out losses: per_token ± spread nats/token, alternating."""
    run = root / name
    run.mkdir()
    config = {"model": "m", "dataset": "builtin:pydoc", "eval_fraction": 0.1, "seed": 0, "max_length": 256,
              "method": method, "lr": 1e-3 if method == "lora" else 1e-4, "rank": 16}
    summary = {"method": method, "final_eval_loss": per_token, "config": config, "steps": 100, "global_batch": 4,
               "data_fingerprint": "abc"}
    (run / "summary.json").write_text(json.dumps(summary))
    train = [[s, 2.5 - 0.1 * s**0.5] for s in range(1, 101)]
    (run / "curves.json").write_text(json.dumps({"train": train, "eval": eval_points}))
    nll = [(per_token + (spread if i % 2 else -spread)) * TOKENS for i in range(N)]
    (run / EVAL_SCORES_FILE).write_text(json.dumps(
        scores_record(SUPERVISED, [str(i) for i in range(N)], [TOKENS] * N, [[0, [24.0] * N], [100, nll]])))
    return run


@pytest.fixture
def runs(tmp_path):
    lora = write_run(tmp_path, "lora-r16", "lora", 1.215, [[0, 2.4], [10, 1.9], [100, 1.215]])
    full = write_run(tmp_path, "full", "full", 1.200, [[0, 2.4], [10, 1.8], [100, 1.200]])
    return lora, full


def test_compare_table_interval_and_verdict(runs, capsys):
    lora, full = runs
    assert main(["compare", "--lora", str(lora), "--full", str(full)]) == 0
    out = capsys.readouterr().out
    assert "      10    1.9000    1.8000    +0.1000     +5.56%" in out
    assert "   final    1.2150    1.2000    +0.0150     +1.25%" in out
    assert "held-out: 200 examples, 2,000 completion tokens, the same for both methods" in out
    assert "regret +0.0150 nats/token, 95% interval [+0.0150, +0.0150]" in out  # no spread in the differences
    # (2.4 - 1.215) / (2.4 - 1.2) = 0.9875
    assert "base model loss 2.4000 nats/token; LoRA recovered 98.7% [98.7%, 98.8%]" in out
    # default allowed regret: max(1% of 1.2, 0.01) = 0.012 < 0.015
    assert "= 0.0120 nats/token" in out
    assert "run: LoRA LR 0.001 = 10x FullFT's 0.0001; global batch 4; 100 steps" in out
    assert "FAIL: LoRA trails FullFT: the whole 95% interval [+0.0150, +0.0150] is above the allowed 0.0120" in out


def test_compare_json_threshold_and_exit_codes(runs, tmp_path, capsys):
    lora, full = runs
    args = ["compare", "--lora", str(lora), "--full", str(full), "--json"]
    assert main(args + ["--threshold", "0.02"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["passed"] is True and record["verdict"] == "PASS"
    assert record["allowed_regret_nats"] == pytest.approx(0.024)
    assert record["regret_nats"] == pytest.approx(0.015)
    assert [p["step"] for p in record["matched"]] == [10, 100]
    assert main(args + ["--threshold", "0.001", "--threshold-abs", "0.001", "--exit-code"]) == 1
    assert json.loads(capsys.readouterr().out)["verdict"] == "FAIL"
    noisy = write_run(tmp_path, "noisy", "lora", 1.215, [[0, 2.4], [100, 1.215]], spread=1.0)
    assert main(["compare", "--lora", str(noisy), "--full", str(full), "--exit-code"]) == 3
    assert "INCONCLUSIVE: the 95% interval" in capsys.readouterr().out


def test_compare_refuses_a_run_against_itself(runs, capsys):
    _, full = runs
    assert main(["compare", "--lora", str(full), "--full", str(full), "--exit-code"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_compare_writes_chart(runs, tmp_path, capsys):
    lora, full = runs
    chart = tmp_path / "charts" / "regret.png"
    assert main(["compare", "--lora", str(lora), "--full", str(full), "--chart", str(chart)]) == 0
    assert chart.stat().st_size > 10_000
    assert f"chart: {chart}" in capsys.readouterr().out


def test_missing_run_dir_is_a_clean_error(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "compare",
            "--lora",
            str(tmp_path / "nope"),
            "--full",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "lowregret compare: error:" in out.stderr and "not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_dir_without_summary(runs, tmp_path, capsys):
    lora, _ = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", "--lora", str(lora), "--full", str(empty)]) == 2
    assert "no summary.json" in capsys.readouterr().err
