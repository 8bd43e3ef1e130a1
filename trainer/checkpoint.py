"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG states and run state.

A checkpoint is a directory `checkpoints/step-N/` written as `checkpoints/.step-N.tmp` and renamed
once complete, so a run killed mid-write leaves only a temporary directory that is ignored. Under
FSDP2 the weights and AdamW state are sharded: every rank writes its shards into the temporary
directory (`trainer.distributed.save_sharded`, DCP as safetensors), all ranks meet, and only then does
the main process write the rest and rename it; a rank killed at any moment leaves the previous
checkpoint as it was. The
trainable parameters (the adapter for LoRA, every weight for full) are stored by name; frozen base
weights are not, they come from the base model again. RNG states are the main process's; the loop
draws no random numbers after setup (dropout 0, data order from the seed), they are kept for safety.

Nothing read back can run code: tensors are safetensors, the RNG states are tensors and JSON, and the
optimizer and scheduler states go through `torch.load(weights_only=True)`, which accepts tensors and
plain containers only (a checkpoint may come from someone else; a pickle would run on load).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from data.errors import UserError

STATE_FILE = "state.json"
RNG_TENSORS = "rng.safetensors"  # torch CPU and CUDA generator states (uint8 tensors)
RNG_STATE = "rng.json"  # Python's and NumPy's Mersenne Twister states as plain numbers
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints under run_dir/checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint dir for `path`: itself if it is one, else the newest under path/checkpoints."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int,
                    sharded: bool = False, is_main: bool = True, barrier=None) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`.

    Unsharded: the main process alone calls it. Sharded (FSDP2): every rank calls it, with `is_main`
    and `barrier` (wait for every rank) from the loop's accelerator.

    Raises:
        UserError: the disk is full (or another write error): the half-written `.step-N.tmp` is
            removed, the earlier checkpoints stay, and the message names the disk and the space
            the last complete checkpoint took.
    """
    try:
        return _save_checkpoint(run_dir, step, model, optimizer, scheduler, state, keep, sharded, is_main, barrier)
    except OSError as exc:
        import errno

        tmp = Path(run_dir) / "checkpoints" / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        earlier = list_checkpoints(run_dir)
        need = sum(f.stat().st_size for f in earlier[-1].rglob("*") if f.is_file()) if earlier else None
        free = shutil.disk_usage(run_dir).free
        raise UserError(
            f"No space left on the disk of {run_dir} while writing checkpoint step-{step} ({free:,} bytes free"
            + (f"; a checkpoint takes about {need:,}" if need else "") + "). The incomplete checkpoint was removed"
            + (f" and {earlier[-1].name} is intact: free space, then resume=auto." if earlier
               else ": free space (or checkpoint_every=0) and start again.")) from None


def _save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int,
                     sharded: bool, is_main: bool, barrier) -> Path:
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step-{step}"
    tmp = folder / f".step-{step}.tmp"
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if sharded:
        from trainer.distributed import SHARDS_DIR, save_sharded

        barrier()  # the folder exists before any rank writes into it
        save_sharded(tmp / SHARDS_DIR, model, optimizer)
        barrier()  # every rank's shards are on disk before the checkpoint is declared complete
        if not is_main:
            return final
    else:
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    _save_rng(tmp)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> dict:
    """The checkpoint's state.json (checked JSON: `data.guard.read_json`), an object."""
    from data.guard import read_json

    state = read_json(Path(checkpoint) / STATE_FILE, "resume from a checkpoint this trainer wrote, or start a fresh run.")
    if not isinstance(state, dict):
        raise UserError(f"{Path(checkpoint) / STATE_FILE} is not a checkpoint state (a JSON object): start a fresh run.")
    return state


def check_state(checkpoint: Path, state: dict, max_steps: int, curve: str) -> None:
    """Refuse a state.json that does not describe its own checkpoint: the step a whole number in
    [1, max_steps] equal to the folder's step-N, and the `curve` (the per-step training curve:
    "train" or "train_reward") holding one point per step up to it; for a supervised run also
    `examples_seen` = step x global batch and a token count >= 0. A tampered step would otherwise
    resume "at step 1000000000000" as a finished run that never trained.

    Raises:
        UserError: naming the checkpoint and what is inconsistent.
    """
    def refuse(problem: str) -> UserError:
        return UserError(f"Cannot resume from {checkpoint}: its {STATE_FILE} {problem}, so it does not describe this "
                         "checkpoint (damaged or edited). Resume from an earlier checkpoint, or start a fresh run "
                         "(overwrite=true).")

    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= max_steps:
        raise refuse(f"says step {step!r:.40}, not a step of this run's 1..{max_steps}")
    match = _STEP_DIR.match(Path(checkpoint).name)
    if match and int(match.group(1)) != step:
        raise refuse(f"says step {step}, and the folder is {Path(checkpoint).name}")
    curves = state.get("curves")
    points = curves.get(curve) if isinstance(curves, dict) else None
    if not (isinstance(points, list) and len(points) == step and all(
            isinstance(p, list) and len(p) == 2 and p[0] == i + 1 for i, p in enumerate(points))):
        raise refuse(f"has no {curve!r} curve of one point per step up to step {step}")
    if "examples_seen" in state or "tokens" in state:
        tokens, batch = state.get("tokens"), state.get("global_batch")
        if state.get("examples_seen") != step * (batch if isinstance(batch, int) else 0):
            raise refuse(f"counts {state.get('examples_seen')!r:.40} examples seen, not step x global batch")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise refuse(f"counts {tokens!r:.40} tokens")


def check_resumable(checkpoint: Path, state: dict, config_hash: str, global_batch: int, processes: int,
                    sharding: str) -> None:
    """Refuse to resume a checkpoint another configuration or process layout wrote (the supervised
    loop's and RL's, whose global batch is its episodes per step).

    A sharded checkpoint could be read into another world size (DCP reshards), but the step's
    micro-batches would then be summed in another order and the run would no longer equal the
    uninterrupted one bit for bit; so resuming keeps the process count and sharding it was written with.

    Raises:
        UserError: the config, data, global batch, process count or sharding differs.
    """
    if state.get("config_hash") != config_hash or state.get("global_batch") != global_batch:
        raise UserError(
            f"Cannot resume from {checkpoint}: it was written by another configuration "
            f"(hash {state.get('config_hash')}, global batch {state.get('global_batch')}; "
            f"now {config_hash}, {global_batch}). Resume with the same config, data and process count, "
            "or start a fresh run in another output_dir."
        )
    written = (state.get("processes", 1), state.get("sharding", "single" if processes == 1 else "ddp"))
    if written != (processes, sharding):
        raise UserError(
            f"Cannot resume from {checkpoint}: it was written by {written[0]} process(es) with sharding "
            f"{written[1]}, this run has {processes} with {sharding}. Resume with launch.processes="
            f"{written[0]} (and the same launch.sharding): another layout would not continue the run exactly."
        )


def load_checkpoint(checkpoint: Path, model, optimizer, scheduler, sharded: bool = False) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `checkpoint`; return its state dict.
    Sharded (FSDP2): every rank calls it and reads its own shards.

    Raises:
        UserError: the checkpoint's trainable parameters do not match the model's.
    """
    checkpoint = Path(checkpoint)
    if sharded:
        from trainer.distributed import SHARDS_DIR, load_sharded

        load_sharded(checkpoint / SHARDS_DIR, model, optimizer)
        scheduler.load_state_dict(_load_plain(checkpoint / "scheduler.pt"))
        _load_rng(checkpoint)
        return read_state(checkpoint)
    weights = load_file(checkpoint / "trainable.safetensors")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise UserError(
            f"Checkpoint {checkpoint} holds other trainable parameters than this model "
            f"({len(weights)} vs {len(params)} tensors): it comes from another method or targets."
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(_load_plain(checkpoint / "optimizer.pt"))
    scheduler.load_state_dict(_load_plain(checkpoint / "scheduler.pt"))
    _load_rng(checkpoint)
    return read_state(checkpoint)


def _load_plain(path: Path):
    """`torch.load` restricted to tensors and plain containers: a pickle payload is refused, not run."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{path} holds Python objects other than tensors, numbers and containers, which are not loaded "
            "because unpickling them could run code. Resume only from checkpoints this trainer wrote."
        ) from exc


def _save_rng(folder: Path) -> None:
    version, mt_state, gauss = random.getstate()
    name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    (folder / RNG_STATE).write_text(json.dumps({
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss},
        "numpy": {"name": name, "keys": np_keys.tolist(), "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
    }))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    save_file(tensors, folder / RNG_TENSORS)


def _load_rng(checkpoint: Path) -> None:
    if not (checkpoint / RNG_STATE).is_file():
        raise UserError(
            f"{checkpoint} has no {RNG_STATE}: it was written by an older trainer that kept RNG states as a "
            "pickle (rng.pt), which is not loaded because unpickling could run code. Start a fresh run."
        )
    plain = json.loads((checkpoint / RNG_STATE).read_text())
    python, numpy_state = plain["python"], plain["numpy"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    np.random.set_state((numpy_state["name"], np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    tensors = load_file(checkpoint / RNG_TENSORS)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
