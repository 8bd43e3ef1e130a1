"""`lowregret lr-sweep` over run directories with a known optimum."""

import json
import math

import pytest

from flows.cli import main


def write_run(root, method, rank, lr, loss):
    run = root / f"{method}-r{rank}-lr{lr:g}"
    run.mkdir()
    config = {"method": method, "rank": rank, "lr": lr}
    (run / "summary.json").write_text(
        json.dumps({"method": method, "final_eval_loss": loss, "config": config})
    )
    (run / "curves.json").write_text(json.dumps({"train": [], "eval": [[0, 3.0], [10, loss]]}))
    return run


def sweep(root, method, rank, best_lr, lrs, floor):
    return [
        str(write_run(root, method, rank, lr, floor + 0.2 * (math.log10(lr / best_lr)) ** 2)) for lr in lrs
    ]


def test_lr_sweep_table_and_json(tmp_path, capsys):
    runs = sweep(tmp_path, "full", 0, 2e-5, [3e-6, 1e-5, 3e-5, 1e-4], 1.0)
    runs += sweep(tmp_path, "lora", 16, 2e-4, [3e-5, 1e-4, 3e-4, 1e-3], 1.01)
    runs += sweep(tmp_path, "lora", 1, 2e-4, [3e-5, 1e-4], 1.2)  # too few LRs
    assert main(["lr-sweep", *runs]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=16 optimal LR / FullFT optimal LR = 10.00x (the paper finds ~10x)" in out
    assert "too_few_lrs" in out
    assert main(["lr-sweep", *runs, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    full = next(g for g in record["groups"] if g["method"] == "full")
    assert full["optimum_lr"] == pytest.approx(2e-5, rel=1e-6)
    assert full["rank"] is None


def test_lr_sweep_run_without_lr_is_user_error(tmp_path, capsys):
    run = write_run(tmp_path, "lora", 4, 1e-4, 1.0)
    (run / "summary.json").write_text(json.dumps({"method": "lora", "final_eval_loss": 1.0, "config": {}}))
    assert main(["lr-sweep", str(run)]) == 2
    assert "config.lr" in capsys.readouterr().err
