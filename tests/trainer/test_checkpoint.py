"""Checkpoints read back nothing that can run code: a planted pickle payload is refused, not run."""

import os
import random
import shutil

import numpy as np
import pytest
import torch

from data.errors import UserError
from trainer import checkpoint as ckpt
from trainer.loop import train


class _Payload:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_rng_states_round_trip_through_tensors_and_json(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt._save_rng(tmp_path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt._load_rng(tmp_path)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert {p.name for p in tmp_path.iterdir()} == {ckpt.RNG_STATE, ckpt.RNG_TENSORS}


@pytest.fixture(scope="module")
def finished_run(tiny_models, tmp_path_factory):
    """A 4-step LoRA run that kept its step-2 checkpoint."""
    from tests.trainer.conftest import write_rows
    from trainer.config import TrainConfig

    root = tmp_path_factory.mktemp("ckpt")
    config = dict(model=str(tiny_models("llama")), dataset=str(write_rows(root / "rows.jsonl")), rank=4, lr=1e-2,
                  max_steps=4, batch_size=4, max_length=64, eval_points=2, eval_max_examples=8,
                  checkpoint_every=2)
    train(TrainConfig(**config, output_dir=str(root / "run")), progress=False)
    return root / "run" / "checkpoints" / "step-2", config


@pytest.mark.parametrize("planted", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(finished_run, tmp_path, planted):
    from trainer.config import TrainConfig

    source, config = finished_run
    checkpoint = tmp_path / "step-2"
    shutil.copytree(source, checkpoint)
    marker = tmp_path / "payload-ran"
    if planted == "rng.pt":  # the old format kept RNG states as a pickle; it is never loaded now
        for name in (ckpt.RNG_STATE, ckpt.RNG_TENSORS):
            (checkpoint / name).unlink()
    torch.save({"state": _Payload(marker), "param_groups": []}, checkpoint / planted)

    out = tmp_path / "resumed"
    with pytest.raises(UserError, match="could run code"):
        train(TrainConfig(**config, output_dir=str(out), resume=str(checkpoint)), progress=False)
    assert not marker.exists(), "the payload ran"
    assert not out.exists() and not out.with_name("resumed.partial").exists()


def test_a_full_disk_while_checkpointing_is_one_paragraph_and_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """ENOSPC in the middle of a checkpoint: the .step-N.tmp is removed, the earlier checkpoint stays, and the
    error names the disk's free space and a checkpoint's size."""
    import errno

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = {"curves": {"train": [[1, 1.0]]}}
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, state, keep=2)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_save_rng", full)
    with pytest.raises(UserError, match=r"No space left on the disk .*free; a checkpoint takes about [\d,]+\).*step-1 is intact"):
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer, scheduler, state, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]
