"""The real `lowregret train` CLI in a subprocess: smoke run, and resume after a SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _cli(args, **kwargs):
    command = [sys.executable, "-m", "flows.cli", "train", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def _preset(tmp_path, model, rows, **extra):
    fields = {"model": str(model), "dataset": str(rows), "method": "lora", "rank": 4, "lr": 1e-2,
              "batch_size": 4, "max_length": 64, "eval_max_examples": 8, **extra}
    path = tmp_path / "preset.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return path


def test_cli_smoke_writes_the_run_and_loss_falls(tmp_path, tiny_models, rows_file):
    preset = _preset(tmp_path, tiny_models("llama"), rows_file, max_steps=8, eval_points=3)
    out = tmp_path / "smoke"
    proc = _cli(["--config", str(preset), f"output_dir={out}", "checkpoint_every=0", "--no-progress"])
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    assert "trainable parameters: 8,192 (LoRA r=4" in stdout
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "curves.json", "summary.json"):
        assert (out / name).is_file(), name
    assert not (tmp_path / "smoke.partial").exists()
    curves = json.loads((out / "curves.json").read_text())
    assert curves["eval"][-1][1] < curves["eval"][0][1] - 0.05
    assert json.loads((out / "summary.json").read_text())["trainable_params"] == 8192
    from planner.lora import count_lora_params
    from planner.shapes import load_shape

    planned = count_lora_params(load_shape(json.loads((tiny_models("llama") / "config.json").read_text())), 4)
    assert f"trainable parameters: {planned.total:,} (LoRA" in stdout


def test_cli_bad_input_exits_2_without_traceback(tmp_path, tiny_models, rows_file):
    preset = _preset(tmp_path, tiny_models("llama"), rows_file, max_steps=2)
    proc = _cli(["--config", str(preset), f"output_dir={tmp_path / 'bad'}", "rank=0"])
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "rank=0" in stdout and "Traceback" not in stdout
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_losses(tmp_path, tiny_models, rows_file):
    preset = _preset(tmp_path, tiny_models("llama"), rows_file, max_steps=24, eval_points=6, checkpoint_every=4)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    proc = _cli(["--config", str(preset), f"output_dir={straight}", "--no-progress"])
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout

    proc = _cli(["--config", str(preset), f"output_dir={broken}", "--no-progress"])
    first_checkpoint = tmp_path / "broken.partial" / "checkpoints" / "step-4" / "state.json"
    deadline = time.monotonic() + 240
    while not first_checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not broken.exists(), "a killed run must not leave output under the final name"

    proc = _cli(["--config", str(preset), f"output_dir={broken}", "resume=auto", "--no-progress"])
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    assert "resumed from" in stdout

    want = json.loads((straight / "curves.json").read_text())
    got = json.loads((broken / "curves.json").read_text())
    for kind in ("train", "eval"):
        assert [s for s, _ in got[kind]] == [s for s, _ in want[kind]]
        for (step, loss), (_, expected) in zip(got[kind], want[kind], strict=True):
            assert loss == pytest.approx(expected, abs=1e-6), (kind, step)
    assert json.loads((broken / "summary.json").read_text())["resumed_from_step"] >= 4
