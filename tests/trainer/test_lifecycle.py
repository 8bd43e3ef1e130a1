"""The run lifecycle both loops share (trainer/lifecycle.py): throughput and MFU from planner.flops,
and the one resume check."""

from __future__ import annotations

import pytest
import torch

from data.errors import UserError
from trainer import checkpoint as ckpt
from trainer import lifecycle


def test_mfu_is_model_flops_per_second_over_the_devices_peak(tiny_config, monkeypatch):
    from planner.flops import estimate_flops
    from planner.gpus import get_gpu
    from planner.lora import count_lora_params
    from planner.shapes import load_shape

    config = tiny_config(method="full")
    shape = load_shape(config.model)
    per_token = estimate_flops(shape, count_lora_params(shape, config.rank), 37).fullft_flops_per_token

    cpu = lifecycle.Throughput(config, 37.0, torch.device("cpu"), world_size=2)
    metrics = cpu.add(1_000, 0.5)
    assert cpu.flops_per_token == per_token
    assert metrics == {"tokens_per_s": 2_000.0, "model_flops_per_s": 2_000.0 * per_token}  # no peak: no MFU
    assert cpu.summary()["mfu"] is None and "cpu" in cpu.summary()["mfu_note"]

    # On a GPU the catalog's dense bf16 peak per device (an H100 here), times the world size.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    gpu = lifecycle.Throughput(config, 37.0, torch.device("cuda", 0), world_size=2)
    metrics = gpu.add(1_000, 0.5)
    assert metrics["mfu"] == pytest.approx(2_000.0 * per_token / (2 * get_gpu("H100-80GB-SXM").peak_bf16_flops))
    assert gpu.summary()["planner_assumed_mfu"] == 0.4


def test_lora_flops_are_the_adapters_and_an_unshaped_model_has_none(tiny_config):
    lora = lifecycle.Throughput(tiny_config(method="lora"), 37.0, torch.device("cpu"), 1)
    full = lifecycle.Throughput(tiny_config(method="full"), 37.0, torch.device("cpu"), 1)
    assert 0.5 < lora.flops_per_token / full.flops_per_token < 1.0  # frozen weights skip their weight gradient
    unknown = lifecycle.Throughput(tiny_config(model="no/such-model-here"), 37.0, torch.device("cpu"), 1)
    assert unknown.flops_per_token is None and unknown.add(10, 1.0) == {"tokens_per_s": 10.0}


def test_the_resume_check_names_what_differs(tmp_path):
    state = {"config_hash": "abc", "global_batch": 4, "processes": 2, "sharding": "fsdp"}
    ckpt.check_resumable(tmp_path, state, "abc", 4, 2, "fsdp")
    with pytest.raises(UserError, match="another configuration"):
        ckpt.check_resumable(tmp_path, state, "abd", 4, 2, "fsdp")
    with pytest.raises(UserError, match="written by 2 process\\(es\\) with sharding fsdp, this run has 4"):
        ckpt.check_resumable(tmp_path, state, "abc", 4, 4, "fsdp")
    with pytest.raises(UserError, match="another configuration"):  # an RL checkpoint from before the check
        ckpt.check_resumable(tmp_path, {"config_hash": "abc"}, "abc", 64, 1, "single")


def test_checkpoints_follow_the_cadence_and_never_the_last_step(tiny_config):
    config = tiny_config(checkpoint_every=3)
    assert [s for s in range(1, 10) if lifecycle.checkpoint_due(config, s, 9)] == [3, 6]
    assert not any(lifecycle.checkpoint_due(tiny_config(checkpoint_every=0), s, 9) for s in range(1, 10))
