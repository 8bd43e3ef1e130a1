"""Training on several processes through the one launcher (`launch.processes`, trainer/launch.py):
2 gloo processes on CPU, tiny Llama from a real config.

- FSDP2 FullFT and LoRA, and DDP LoRA, equal a 1-process run of the same global batch (1 process x 2
  accumulation steps vs 2 processes x 1). DDP all-reduces in a fixed order and comes out identical;
  FSDP's reduce-scatter sums the two ranks' gradients in another order than accumulation does, so its
  curves differ in the 7th digit (measured 2026-12-07: at most 5.9e-7 nats train, 1.4e-7 eval): the
  tolerance is 5e-6. Each FSDP test asserts the parameters were DTensors, or it would be testing DDP.
- kill -9 of one rank at a random checkpoint, then the same command with resume=auto: curves and
  weights identical to an uninterrupted 2-process run.
- Two launchers as nodes 0 and 1 (loopback) train one run: identical to the one-node 2-process run.
- RL (`rl-train`): 2 processes, DDP LoRA and FSDP2 FullFT, draw the episodes 1 process draws; kill -9
  and resume.
- Bad input (nodes without an address, sharding one process, a rank's user error): exit 2, one
  paragraph, nothing written.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.infra.stack import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _options(model: Path, rows: Path, out: Path, method: str, **extra) -> list[str]:
    fields = {"model": model, "dataset": rows, "method": method, "rank": 4, "lr": 1e-2 if method == "lora" else 1e-3,
              "max_steps": 6, "batch_size": 2, "max_length": 64, "eval_points": 3, "eval_max_examples": 8,
              "checkpoint_every": 0, "seed": 0, "output_dir": out} | extra
    return [f"{key}={value}" for key, value in fields.items()]


def _train(options: list[str], check: bool = True, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--no-progress", *options], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, **popen)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _curves(run: Path) -> dict:
    return json.loads((run / "curves.json").read_text())


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    sub = run / ("adapter" if (run / "adapter").is_dir() else "model")
    return load_file(next(sub.glob("*.safetensors")))


@pytest.mark.parametrize("method, sharding", [("full", "fsdp"), ("lora", "fsdp"), ("lora", "ddp")])
def test_two_processes_equal_one_process_of_the_same_global_batch(tmp_path, tiny_models, rows_file, method, sharding):
    model = tiny_models("llama")
    one, two = tmp_path / "one", tmp_path / "two"
    _train(_options(model, rows_file, one, method, grad_accum_steps=2))
    done = _train(_options(model, rows_file, two, method, grad_accum_steps=1) + ["launch.processes=2",
                                                                                f"launch.sharding={sharding}"])
    assert f"launch: 2 processes, sharding {sharding}" in done.stdout

    summary = json.loads((two / "summary.json").read_text())
    assert (summary["processes"], summary["sharding"], summary["global_batch"]) == (2, sharding, 4)
    assert summary["sharded_parameters"] is (sharding == "fsdp")
    tolerance = 5e-6 if sharding == "fsdp" else 0.0
    curves_one, curves_two = _curves(one), _curves(two)
    for name in ("train", "eval"):
        assert [s for s, _ in curves_two[name]] == [s for s, _ in curves_one[name]]
        for (_, a), (_, b) in zip(curves_one[name], curves_two[name], strict=True):
            assert abs(a - b) <= tolerance, (name, a, b)
    assert curves_one["train"][-1][1] < curves_one["train"][0][1], "the runs must actually learn"
    weights_one, weights_two = _weights(one), _weights(two)
    assert set(weights_one) == set(weights_two)
    for key, value in weights_one.items():
        assert (weights_two[key] - value).abs().max().item() <= 1e-4, key  # lr 1e-2 x 6 steps of rounding


def _workers(pid: int) -> list[int]:
    import psutil

    # The ranks, not torchrun's agent (whose command line names trainer.worker too).
    return [p.pid for p in psutil.Process(pid).children(recursive=True)
            if "trainer.worker" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]


def test_kill_of_a_rank_then_the_same_command_resumes_exactly(tmp_path, tiny_models, rows_file):
    model = tiny_models("llama")
    common = ["max_steps=40", "checkpoint_every=3", "launch.processes=2"]
    reference = tmp_path / "reference"
    _train(_options(model, rows_file, reference, "full") + common)

    out = tmp_path / "killed"
    command = _options(model, rows_file, out, "full") + common
    kill_after = random.Random().choice(range(3, 25, 3))  # a random checkpoint, so a random step
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--no-progress", *command], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = out.with_name(out.name + ".partial") / "checkpoints" / f"step-{kill_after}"
    deadline = time.monotonic() + 300
    while not checkpoint.is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.05)
    victim = random.Random().choice(_workers(proc.pid))
    os.kill(victim, 9)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-2000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("lowregret train: training failed: rank ") and "SIGKILL" in message, message
    assert not out.exists() and not _workers(os.getpid())

    # A damaged shard (its safetensors header overwritten) is refused in one paragraph by every rank.
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(out.with_name(out.name + ".partial"), damaged.with_name("damaged.partial"))
    shard = sorted(damaged.with_name("damaged.partial").glob("checkpoints/step-*/shards/*.safetensors"))[0]
    with shard.open("r+b") as f:
        f.write(b"not a safetensors header")
    refused = _train(_options(model, rows_file, damaged, "full") + common + ["resume=auto"], check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1].startswith("lowregret train: error: Cannot resume from ")
    assert not damaged.exists()

    resumed = _train(command + ["resume=auto"])
    assert "resumed from" in resumed.stdout
    assert _curves(out) == _curves(reference)
    weights, expected = _weights(out), _weights(reference)
    assert set(weights) == set(expected) and all((weights[k] == expected[k]).all() for k in expected)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] >= kill_after and summary["sharding"] == "fsdp"


def test_two_nodes_on_one_machine_train_one_run(tmp_path, tiny_models, rows_file):
    model = tiny_models("llama")
    single = tmp_path / "single-node"
    _train(_options(model, rows_file, single, "full") + ["launch.processes=2"])

    out = tmp_path / "two-nodes"
    nodes = _options(model, rows_file, out, "full") + ["launch.nodes=2", "launch.main_address=127.0.0.1",
                                                       f"launch.main_port={free_port()}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    second = subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--no-progress", *nodes,
                               "launch.node_rank=1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    _train(nodes + ["launch.node_rank=0"])
    assert second.wait(timeout=120) == 0, second.stdout.read()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processes"], summary["sharding"]) == (2, "fsdp")
    assert _curves(out) == _curves(single)


def test_bad_launches_are_refused_in_one_paragraph_before_anything_is_written(tmp_path, tiny_models, rows_file):
    model = tiny_models("llama")
    out = tmp_path / "run"
    cases = {
        "launch.nodes=2 needs launch.main_address and launch.main_port": ["launch.nodes=2"],
        "launch.sharding=fsdp needs more than one process": ["launch.sharding=fsdp"],
        "launch.node_rank=2: must be below launch.nodes=2": ["launch.nodes=2", "launch.node_rank=2",
                                                           "launch.main_address=127.0.0.1", "launch.main_port=29500"],
        "Unknown launch option(s) gpus": ["launch.gpus=2"],
        # Found by every rank (the target is resolved on the loaded model): the lowest rank's message.
        "nonexistent_proj": ["launch.processes=2", "targets=nonexistent_proj"],
    }
    for expected, extra in cases.items():
        done = _train(_options(model, rows_file, out, "lora") + extra, check=False)
        assert done.returncode == 2, (extra, done.stdout[-2000:], done.stderr[-2000:])
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("lowregret train: error: ") and expected in last, (extra, done.stderr[-2000:])
        assert "Traceback" not in done.stderr
        assert not out.exists() and not out.with_name("run.partial").exists(), extra


def test_more_processes_than_gpus_is_refused(monkeypatch, tiny_config):
    import torch

    from data.errors import UserError
    from trainer.launch import check_launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="launch.processes=4 but this machine has 2 GPU"):
        check_launch(tiny_config(launch={"processes": 4}))
    check_launch(tiny_config(launch={"processes": 2}))


def test_processes_auto_is_the_plans_fewest_gpus(tiny_config):
    from trainer.launch import resolve_launch

    tiny = resolve_launch(tiny_config(method="full", launch={"processes": "auto"}))
    assert (tiny.launch.processes, tiny.launch.sharding) == (1, "auto")
    # The planner's own flagship case: Llama-3.1-8B FullFT needs 2 H100s (sharded), LoRA one.
    full = resolve_launch(tiny_config(model="Llama-3.1-8B", method="full", launch={"processes": "auto"}))
    lora = resolve_launch(tiny_config(model="Llama-3.1-8B", method="lora", launch={"processes": "auto"}))
    assert full.launch.processes >= 2 and lora.launch.processes == 1


def test_world_size_enters_the_run_hash_only_beyond_one_process(tiny_config):
    one = tiny_config()
    assert one.hash("d") == tiny_config(launch={"processes": 1}).hash("d")
    assert one.hash("d") != tiny_config(launch={"processes": 2}).hash("d")
    assert (tiny_config(launch={"processes": 2, "sharding": "fsdp"}).hash("d")
            == tiny_config(launch={"processes": 2, "sharding": "ddp"}).hash("d"))


def _rl(options: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "rl-train", "--no-progress", *options], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_rl_on_two_processes_equals_one_process_and_resumes_after_a_kill(tmp_path, tiny_models):
    """RL's ranks sample whole groups, each episode seeded by (seed, step, prompt, sample) alone, so 2
    processes draw the same episodes as one and the curves and held-out rewards are identical. The weights
    agree to 7e-9 after one step (the order of the gradient sums) and drift apart as AdamW divides
    near-zero gradients by their own size: measured 2026-12-07 after 6 steps, 1.5e-3 LoRA/DDP (lr 3e-2),
    2.0e-6 FullFT/FSDP2 (lr 1e-3); the tolerance is 1e-2. micro_batch_size=3 and groups without signal
    (the reward) make the ranks hold unequal numbers of micro-batches. A kill -9 of a rank after a
    checkpoint, then the same command, ends bit-identical to the uninterrupted 2-process run. ~56 s."""
    from tests.trainer.test_rl import write_prompts

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    model = tiny_models("llama")

    def options(out: Path, method: str, *extra: str) -> list[str]:
        fields = {"model": model, "dataset": prompts, "method": method,
                  "reward": "python:tests.trainer.rl_task:vowel_share_but_none_for_zero", "rank": 2,
                  "lr": 3e-2 if method == "lora" else 1e-3, "max_steps": 6, "prompts_per_step": 4, "group_size": 4,
                  "max_new_tokens": 4, "eval_points": 3, "eval_max_examples": 6, "micro_batch_size": 3,
                  "checkpoint_every": 2, "output_dir": out}
        return [f"{key}={value}" for key, value in fields.items()] + list(extra)

    for method, sharding in (("lora", "ddp"), ("full", "fsdp")):
        one, two = tmp_path / f"{method}-one", tmp_path / f"{method}-two"
        _rl(options(one, method))
        done = _rl(options(two, method, "launch.processes=2"))
        assert f"launch: 2 processes, sharding {sharding}" in done.stdout
        summary = json.loads((two / "summary.json").read_text())
        assert (summary["processes"], summary["sharding"], summary["sharded_parameters"]) == (
            2, sharding, sharding == "fsdp")
        assert _curves(two) == _curves(one)
        rewards = [json.loads((run / "eval_scores.json").read_text()) for run in (one, two)]
        assert rewards[0]["by_step"] == rewards[1]["by_step"] and rewards[0]["examples"] == rewards[1]["examples"]
        curves = _curves(one)
        assert min(f for _, f in curves["signal_fraction"]) < 1, "some groups must carry no signal"
        assert max(r for _, r in curves["train_reward"][3:]) > curves["train_reward"][0][1], "the policy must learn"
        weights_one, weights_two = _weights(one), _weights(two)
        assert set(weights_one) == set(weights_two)
        difference = max((weights_two[k] - v).abs().max().item() for k, v in weights_one.items())
        print(f"RL {method}/{sharding}: largest weight difference, 2 processes vs 1: {difference:.2e}")
        assert difference <= 1e-2  # 5% of the most AdamW moves a LoRA weight in 6 steps (lr x 6 = 0.18)

    # kill -9 of one FSDP2 rank after a checkpoint; the same command with resume=auto finishes the run.
    out = tmp_path / "killed"
    command = ["rl-train", "--no-progress", *options(out, "full", "launch.processes=2")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *command], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = out.with_name(out.name + ".partial") / "checkpoints" / "step-2"
    deadline = time.monotonic() + 300
    while not checkpoint.is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.02)
    os.kill(random.Random().choice(_workers(proc.pid)), 9)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "SIGKILL" in stderr.strip().splitlines()[-1], stdout[-2000:] + stderr[-2000:]
    assert not out.exists()
    resumed = _rl(command[2:] + ["resume=auto"])
    assert "resumed from" in resumed.stdout
    reference = tmp_path / "full-two"
    assert _curves(out) == _curves(reference)
    weights, expected = _weights(out), _weights(reference)
    assert set(weights) == set(expected) and all(torch_equal(weights[k], expected[k]) for k in expected)
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] >= 2


def torch_equal(a, b) -> bool:
    return bool((a == b).all())
