"""Train one run on several processes: torchrun starts them, this module watches them.

The one way the product trains on more than one process (`launch.processes` > 1 or
`launch.nodes` > 1), used by `lowregret train` and by the pipeline, sweep and RL flows' training
tasks. torchrun (`torch.distributed.run`, what `accelerate launch` runs underneath) starts
`python -m trainer.worker` once per process, each a rank of `trainer.loop.train`; with
`--max-restarts=0` a rank that fails or is killed ends all the others. Each rank writes the error
that stopped it to a file (`trainer.worker`), so the caller sees that rank's message in one
paragraph; a rank killed by a signal leaves none, and torchrun's failure report names its signal.
Torch-free at import: the parent process only reads the children's output and the run's summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from data.errors import UserError
from trainer.config import RunConfig

ERROR_DIR_ENV = "LOWREGRET_ERROR_DIR"  # where each rank writes the error that stopped it


class LaunchFailed(RuntimeError):
    """A rank crashed or was killed: the message names the rank and its error."""


def is_launched(config: RunConfig) -> bool:
    """Whether the run needs the launcher (more than one process in all)."""
    return config.launch.world_size != 1


def resolve_launch(config: RunConfig, gpu: str | None = None) -> RunConfig:
    """The config with `launch.processes: auto` replaced by the plan's fewest GPUs for the run's method
    on `gpu` (the planner's catalog name; None = the planner's default), and for LoRA, sharding auto
    set to fsdp when that plan needs more than one GPU (the frozen base does not fit one). Prints
    nothing; the caller reports the choice (`describe_launch`).

    Raises:
        UserError: the model's shape is unknown to the planner, or no GPU count fits the run.
    """
    launch = config.launch
    if launch.processes != "auto":
        return config
    from planner.plan import DEFAULT_GPU, build_plan
    from trainer.rl_config import RLConfig

    method = "full" if config.method == "full" else "lora"
    if isinstance(config, RLConfig):  # a policy-gradient micro-batch: prompt + completion tokens
        batch, seq_len = config.micro_batch_size, config.max_prompt_tokens + config.max_new_tokens
    else:
        batch, seq_len = config.batch_size * config.grad_accum_steps, config.max_length
    plan = build_plan(config.model, config.rank, targets=config.targets, expert_rank_divisor=config.expert_rank_divisor,
                      target_unembedding=config.target_unembedding, seq_len=seq_len, batch_size=batch,
                      gpu=gpu or DEFAULT_GPU)
    fit = next(f for f in plan.hardware if f.method == method)
    if fit.num_gpus is None:
        raise UserError(f"launch.processes=auto: the plan finds no GPU count on which {config.model} {method} fits "
                        f"one {fit.gpu}. Give launch.processes (and launch.nodes) yourself.")
    per_node = -(-fit.num_gpus // launch.nodes)
    sharding = launch.sharding
    if sharding == "auto" and method == "lora" and fit.num_gpus > 1:
        sharding = "fsdp"
    return dataclasses.replace(config, launch=dataclasses.replace(launch, processes=per_node, sharding=sharding))


def describe_launch(config: RunConfig) -> str:
    """One line saying how the run trains: processes, nodes, sharding and why."""
    from trainer.distributed import choose_sharding

    launch = config.launch
    world = launch.world_size
    sharding = choose_sharding(launch.sharding, config.method, world)
    why = {"fsdp": "weights, gradients and AdamW state sharded (FSDP2)",
           "ddp": "a full replica per process, gradients all-reduced (DDP)"}.get(sharding, "")
    nodes = f" on {launch.nodes} nodes" if launch.nodes > 1 else ""
    return f"launch: {world} processes{nodes}, sharding {sharding}: {why}" if world > 1 else "launch: 1 process"


def check_launch(config: RunConfig) -> None:
    """What the launcher refuses before starting anything.

    Raises:
        UserError: unresolved processes=auto, sharding that one process cannot honour, or more
            processes per node than this machine has GPUs.
    """
    from trainer.distributed import choose_sharding

    launch = config.launch
    if launch.processes == "auto":
        raise UserError("launch.processes=auto must be resolved from the plan first (trainer.launch.resolve_launch).")
    choose_sharding(launch.sharding, config.method, launch.world_size)
    import torch

    if torch.cuda.is_available() and launch.processes > torch.cuda.device_count():
        raise UserError(
            f"launch.processes={launch.processes} but this machine has {torch.cuda.device_count()} GPU(s): one "
            "process per GPU. Lower launch.processes, or add nodes (launch.nodes) for more GPUs."
        )


def run(config: RunConfig, log: Callable[[str], None] = print, progress: bool = True, callbacks: Sequence = (),
        gpu: str | None = None):
    """Train a run config the one way it trains: in this process (`trainer.loop.train`, RL's
    `trainer.rl.train_rl`), or on several processes under torchrun (`launch`). `processes: auto` is
    resolved from the plan on `gpu` first. Callbacks see a launched run's start, curves and result
    once it has finished (the ranks run in other processes).

    Raises:
        UserError: bad input, before any work. LaunchFailed: a rank of a launched run failed.
    """
    from trainer.rl_config import RLConfig

    config = resolve_launch(config, gpu)
    if not is_launched(config):
        return train_here(config, progress, callbacks)
    log(describe_launch(config))
    result = launch(config, log)
    if result is not None and not isinstance(config, RLConfig):  # RL runs take no callbacks
        _replay(config, result, callbacks)
    return result


def train_here(config: RunConfig, progress: bool = True, callbacks: Sequence = ()):
    """Train in this process (one process, or one rank under torchrun): `trainer.loop.train` for a
    TrainConfig, `trainer.rl.train_rl` for an RLConfig (which takes no callbacks)."""
    from trainer.rl_config import RLConfig

    if isinstance(config, RLConfig):
        from trainer.rl import train_rl

        return train_rl(config, progress=progress)
    from trainer.loop import train

    return train(config, progress=progress, callbacks=callbacks)


def write_config(config: RunConfig, path: Path) -> None:
    """The run config for the ranks (`trainer.worker`): its objective and its options, as JSON."""
    from trainer.rl_config import RLConfig

    objective = "rl" if isinstance(config, RLConfig) else "supervised"
    path.write_text(json.dumps({"objective": objective, "config": config.to_dict()}))


def read_config(path: Path) -> RunConfig:
    """The run config `write_config` wrote: a TrainConfig or an RLConfig."""
    from trainer.config import TrainConfig
    from trainer.rl_config import RLConfig

    record = json.loads(path.read_text())
    return (RLConfig if record["objective"] == "rl" else TrainConfig).from_dict(record["config"])


def _result_class(config: RunConfig):
    from trainer.result import TrainResult
    from trainer.rl_config import RLConfig, RLResult

    return RLResult if isinstance(config, RLConfig) else TrainResult


def _replay(config: RunConfig, result, callbacks: Sequence) -> None:
    """A finished launched run told to `callbacks` as a run in this process would have told it: its
    start (from summary.json), every train and eval point of curves.json, and its result."""
    if not callbacks:
        return
    summary = json.loads(Path(result.summary_path).read_text())
    curves = json.loads(Path(result.curves_path).read_text())
    info = {"output_dir": result.output_dir, "steps": result.steps, "global_batch": summary["global_batch"],
            "processes": summary["processes"], "trainable_params": result.trainable_params,
            "config_hash": result.config_hash, "data": summary["data"]}
    points = sorted([(step, 1, {"train_loss": loss}) for step, loss in curves["train"]]
                    + [(step, 2, {"eval_loss": loss}) for step, loss in curves["eval"]], key=lambda p: p[:2])
    for callback in callbacks:
        callback.on_start(config, info)
        for step, _, metrics in points:
            callback.on_step(step, metrics)
        callback.on_end(result)


def torchrun_command(config: RunConfig, config_path: Path) -> list[str]:
    """The torchrun command line of this node's processes."""
    launch = config.launch
    rendezvous = (["--standalone"] if launch.nodes == 1 and launch.main_port is None else
                  [f"--master-addr={launch.main_address or '127.0.0.1'}", f"--master-port={launch.main_port}"])
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={launch.nodes}",
            f"--nproc-per-node={launch.processes}", f"--node-rank={launch.node_rank}", "--max-restarts=0",
            *rendezvous, "-m", "trainer.worker", str(config_path)]


def launch(config: RunConfig, log: Callable[[str], None] = print):
    """Train `config` on `launch.processes` × `launch.nodes` processes and return its result (the
    `TrainResult` or `RLResult` read from summary.json; None on a node other than 0 when output_dir is not shared).

    Every line the ranks print goes to `log` as it comes (the Prefect task log in a flow).

    Raises:
        UserError: bad input, found here or by every rank before any work (the ranks' message).
        LaunchFailed: a rank crashed or was killed (its rank and error), after all ranks have ended.
    """
    from trainer.lifecycle import finished_result, preflight_dirs

    check_launch(config)
    finished = finished_result(config, _result_class(config), log)
    if finished is not None:  # a retry of a run that finished: done, no process started
        return finished
    preflight_dirs(config)  # output/resume paths: refused here, before any process starts
    with tempfile.TemporaryDirectory(prefix="lowregret-launch-") as tmp:
        config_path = Path(tmp) / "config.json"
        write_config(config, config_path)
        errors = Path(tmp) / "errors"
        errors.mkdir()
        env = {**os.environ, ERROR_DIR_ENV: str(errors), "PYTHONUNBUFFERED": "1"}
        tail = _run(torchrun_command(config, config_path), env, log)
        if tail is not None:
            _raise_failure(errors, tail, config.launch.world_size)
    summary = Path(config.output_dir) / "summary.json"
    if not summary.is_file():
        return None
    return _result_class(config).from_dict(json.loads(summary.read_text()))


def _run(command: Sequence[str], env: dict, log: Callable[[str], None]) -> deque | None:
    """Run torchrun, stream its lines to `log`; None on success, else its last lines. If this process is
    interrupted (a cancelled flow run, Ctrl-C), torchrun's whole process group is ended too."""
    tail: deque = deque(maxlen=200)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, bufsize=1, errors="replace")
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line)
        code = proc.wait()
    except BaseException:
        _end_group(proc)
        raise
    return None if code == 0 else tail


def _end_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=15)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


_ROOT_CAUSE = "Root Cause (first observed failure)"
_ROOT_FIELD = re.compile(r"^\s*(rank|exitcode|traceback)\s*:\s*(.+?)\s*$")


def _root_cause(tail: deque) -> dict[str, str]:
    """The fields of torchrun's "Root Cause (first observed failure)" block: rank, exitcode, traceback."""
    lines = list(tail)
    at = max((i for i, line in enumerate(lines) if _ROOT_CAUSE in line), default=None)
    fields: dict[str, str] = {}
    for line in lines[at + 1:] if at is not None else ():
        if (m := _ROOT_FIELD.match(line)) and m.group(1) not in fields:
            fields[m.group(1)] = m.group(2)
    if "rank" in fields:
        fields["rank"] = fields["rank"].split()[0]
    return fields


def _raise_failure(errors: Path, tail: deque, world: int) -> None:
    """Raise the error of the rank that failed first (torchrun's root cause): its own message where it
    wrote one, else how it ended (a signal leaves no message). A user error is the same on every rank;
    the lowest rank's is raised. The other ranks' errors (a collective whose peer died) are echoes."""
    records = {r["rank"]: r for r in (json.loads(p.read_text()) for p in errors.glob("rank-*.json"))}
    users = [r for r in records.values() if r["kind"] == "user"]
    if users:
        raise UserError(min(users, key=lambda r: r["rank"])["message"])
    root = _root_cause(tail)
    if "rank" in root:
        rank = int(root["rank"])
        if rank in records:
            raise LaunchFailed(f"rank {rank} of {world} failed: {records[rank]['message']} (its traceback is in "
                               "the log above); torchrun ended the other ranks.")
        raise LaunchFailed(f"rank {rank} of {world} ended with exit code {root.get('exitcode', '?')}: "
                           f"{root.get('traceback', 'no error message')}; torchrun ended the other ranks.")
    if records:
        first = records[min(records)]
        raise LaunchFailed(f"rank {first['rank']} of {world} failed: {first['message']}; all ranks were ended.")
    raise LaunchFailed("torchrun failed before the ranks started: " + " | ".join(list(tail)[-5:]))
