"""The study's experiments as sweep configurations: what is trained, at which scale.

Every group of runs is a `Part`: a `lowregret sweep` config (a pipeline `base` with the model, the
data and the shared training options, plus methods × ranks × LRs) and the tags the analysis reads.
`flows/study.py` submits each part's cells to the sweep flow's own cached task, so a finished
cell is never trained twice and `lowregret sweep --config <part>.yaml` reuses it.

The parts come in stages, because later designs take numbers from earlier runs:
1. `pretrain_part` then `memorise_part`: teach the capacity model the facts format, then to
   store facts (study/facts_model.py).
2. `facts_lr_part` and `lr_parts`: LR sweeps (facts model; SmolLM2 on two real corpora).
3. `knee_parts`, `layers_parts`, `noise_parts`, `batch_parts`: at the LRs stage 2 found.
Two scales: FULL (docs/STUDY.md: 32 min from scratch on a quiet 2-core CPU) and QUICK (CI, ≤ 2 min).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from data.sources import DEFAULT_MODEL
from study.facts_model import ModelSpec

EXPERIMENTS = ("pretrain", "memorise", "facts_lr", "lr", "knee", "layers", "noise", "batch")


@dataclass(frozen=True)
class Scale:
    """Every size the study uses; FULL and QUICK below. Steps are optimizer steps."""

    name: str
    model_spec: ModelSpec
    facts_choices: int
    # Format pre-training of the capacity model: facts about other names, seen about once.
    pretrain_facts: int
    pretrain_steps: int
    pretrain_lr: float
    # Then memorisation of other facts, many passes: the base learns to store facts about names.
    memorise_facts: int
    memorise_steps: int
    facts_batch: int
    facts_max_length: int
    # Capacity knee: dataset sizes, ranks spanning the knee, passes over the data.
    knee_sizes: tuple[int, ...]
    knee_ranks: tuple[int, ...]
    knee_epochs: int
    # The knee runs' LR schedule: cosine decay to 0 after a linear warm-up over this share of the steps.
    knee_schedule: str
    knee_warmup: float
    facts_lora_lrs: tuple[float, ...]
    facts_full_lrs: tuple[float, ...]
    facts_lr_rank: int
    # LR sweeps on a real model and real corpora.
    lr_model: str
    lr_corpora: tuple[str, ...]
    lr_ranks: tuple[int, ...]
    # Ranks per corpus (aligned with lr_corpora); empty: lr_ranks on every corpus.
    lr_corpus_ranks: tuple[tuple[int, ...], ...]
    lr_lora_lrs: tuple[float, ...]
    lr_full_lrs: tuple[float, ...]
    # At most this many extra runs one grid step beyond an LR sweep's edge (FullFT groups first).
    lr_max_extensions: int
    lr_steps: int
    lr_batch: int
    lr_max_length: int
    lr_eval_examples: int
    lr_eval_points: int
    # Layers at matched parameter count: (targets, rank) on the facts model and on the LR model.
    facts_layer_cells: tuple[tuple[str, int], ...]
    lr_layer_cells: tuple[tuple[str, int], ...]
    # Seed replicates of one LoRA/FullFT configuration (seed 0 is the LR sweep's own cell).
    noise_seeds: tuple[int, ...]
    noise_rank: int
    # Batch sizes of LoRA against FullFT on the facts model (same passes over the data).
    batch_sizes: tuple[int, ...]
    batch_rank: int
    batch_facts: int
    workers: int = 2
    notes: tuple[str, ...] = field(default=())

    @property
    def mid_knee_size(self) -> int:
        """The middle knee size: the facts LR sweep's, the layers experiment's and the facts FullFT reference's."""
        return self.knee_sizes[len(self.knee_sizes) // 2]

    def knee_steps(self, n_facts: int, batch: int | None = None) -> int:
        return math.ceil(self.knee_epochs * n_facts / (batch or self.facts_batch))

    def knee_schedule_options(self, steps: int) -> dict:
        """The TrainConfig options of the knee's schedule for a run of `steps` steps."""
        return {"lr_schedule": self.knee_schedule, "warmup_steps": int(self.knee_warmup * steps)}


# The numbers and why (docs/STUDY.md "Scale"). The first study (2026-11-29, commit b0ff254: 61 runs in
# 84 min on a CPU shared with three other engineers, load average 8-18) had a base that memorised 256
# facts, 64-256 knee facts and 40 constant-LR passes; its knee stopped at 75% of FullFT's bits for a
# reason of that base (below; docs/STUDY.md section 1b). This design ran whole on 2026-12-06
# (docs/study/results.json: 69 runs; 32 min from scratch on a quiet 2-core CPU, which reproduced
# every figure), its facts LRs swept at the middle knee size after the smallest size's LR failed on the
# larger sizes' longer runs (docs/STUDY.md section 1).
FULL = Scale(
    name="full",
    model_spec=ModelSpec(),
    facts_choices=32,
    pretrain_facts=20000,
    pretrain_steps=156,
    pretrain_lr=3e-3,
    # 1,024 facts (each value is the answer of ~8 of them, P(a value unused) ≈ 0.03%).
    # With 256 (the first study) ~13% of the values never were, and memorising shrank their tied
    # embeddings to half the others' norm: a frozen-embedding run (LoRA, or FullFT with the
    # embeddings frozen) could not put mass on them, and stopped at 75% of the values' bits at any
    # rank (docs/STUDY.md, section 1b).
    memorise_facts=1024,
    memorise_steps=480,
    facts_batch=32,
    facts_max_length=48,
    # 1,280 / 5,120 / 20,480 bits: the prior's smallest low-regret rank is 1, 4 and 16.
    knee_sizes=(256, 1024, 4096),
    knee_ranks=(1, 2, 4, 8, 16, 32),  # 32: full rank for k_proj and v_proj (32×64)
    knee_epochs=100,
    knee_schedule="cosine",
    knee_warmup=0.05,
    facts_lora_lrs=(1e-3, 3e-3, 1e-2),
    facts_full_lrs=(1e-3, 3e-3, 1e-2),
    facts_lr_rank=4,
    lr_model=DEFAULT_MODEL,
    lr_corpora=("builtin:pydoc", "builtin:numpydoc"),
    lr_ranks=(1, 4, 16, 64),
    lr_corpus_ranks=((1, 4, 16, 64), (1, 64)),  # numpydoc: the two ends only (budget)
    lr_lora_lrs=(1e-3, 3e-3, 1e-2),
    lr_full_lrs=(1e-4, 3e-4, 1e-3),
    lr_max_extensions=8,
    lr_steps=8,
    lr_batch=2,
    lr_max_length=64,
    lr_eval_examples=16,
    lr_eval_points=2,
    # SmolLM2-135M per unit of rank: attention 115,200, MLP 190,080, all 305,280 adapter parameters.
    # all r=16: 4,884,480; attention r=42: 4,838,400 (-0.9%); mlp r=26: 4,942,080 (+1.2%).
    lr_layer_cells=(("all", 16), ("attention", 42), ("mlp", 26)),
    # The facts model per unit of rank: attention 896, MLP 1,152, all 2,048.
    # all r=4: 8,192; attention r=9: 8,064 (-1.6%); mlp r=7: 8,064 (-1.6%).
    facts_layer_cells=(("all", 4), ("attention", 9), ("mlp", 7)),
    noise_seeds=(0, 1, 2),
    noise_rank=16,
    batch_sizes=(32, 128),
    batch_rank=16,
    batch_facts=1024,
)

QUICK = replace(
    FULL,
    name="quick",
    model_spec=ModelSpec(hidden_size=32, intermediate_size=64, vocab_size=512),
    facts_choices=8,
    pretrain_facts=500,
    pretrain_steps=12,
    memorise_facts=64,
    memorise_steps=6,
    facts_batch=32,
    facts_max_length=40,
    knee_sizes=(32, 64),
    knee_ranks=(1, 4),
    knee_epochs=4,
    facts_lora_lrs=(3e-3, 1e-2, 3e-2),
    facts_full_lrs=(1e-3, 3e-3, 1e-2),
    facts_lr_rank=1,
    lr_model="",  # the pre-trained facts model itself: SmolLM2 is too slow for CI
    lr_corpora=("builtin:numpydoc?limit=40",),
    lr_ranks=(1, 4),
    lr_corpus_ranks=(),
    lr_lora_lrs=(1e-3, 3e-3, 1e-2),
    lr_full_lrs=(3e-4, 1e-3, 3e-3),
    lr_steps=3,
    lr_batch=4,
    lr_max_length=96,
    lr_eval_examples=4,
    lr_eval_points=2,
    lr_layer_cells=(("all", 4), ("attention", 9)),
    facts_layer_cells=(("all", 1), ("mlp", 2)),
    noise_seeds=(0, 1),
    noise_rank=4,
    batch_sizes=(8, 32),
    batch_rank=4,
    batch_facts=32,
)
SCALES = {"full": FULL, "quick": QUICK}


@dataclass(frozen=True)
class Part:
    """One sweep of the study.

    Attributes:
        experiment: one of EXPERIMENTS.
        name: unique within the study (also the sweep's pipeline name, hence its run folder).
        sweep: a `lowregret sweep` config as a mapping (flows.config.load_sweep_config's shape).
        tags: what the analysis needs to know about every cell (n_facts, targets, seed, batch, corpus).
    """

    experiment: str
    name: str
    sweep: dict
    tags: dict


def facts_dataset(n_facts: int, choices: int, seed: int = 0) -> str:
    return f"builtin:facts?n_facts={n_facts}&choices={choices}&seed={seed}"


# The sweep's base rank is written into FullFT cells' configs too (and so into their run keys):
# one constant for every part lets parts share their FullFT cells.
_BASE_RANK = 16


def _sweep(name: str, model: str, dataset: str, train: dict, *, lora_lrs=(), full_lrs=(), ranks=(1,)) -> dict:
    methods = [m for m, lrs in (("lora", lora_lrs), ("full", full_lrs)) if lrs]
    return {
        "base": {"name": name, "model": model, "dataset": dataset, "rank": _BASE_RANK, "train": dict(train)},
        "methods": methods,
        "ranks": [int(r) for r in ranks],
        "lora_lrs": [float(x) for x in lora_lrs] or [1e-3],
        "full_lrs": [float(x) for x in full_lrs] or [1e-4],
    }


def _facts_train(scale: Scale, n_facts: int, batch: int | None = None, **extra) -> dict:
    """Memorisation runs: held-out = the training facts themselves, all of them, unpacked."""
    batch = batch or scale.facts_batch
    steps = scale.knee_steps(n_facts, batch)
    return {"eval_dataset": facts_dataset(n_facts, scale.facts_choices), "eval_max_examples": None,
            "max_steps": steps, "batch_size": batch, "max_length": scale.facts_max_length, "eval_points": 6,
            "checkpoint_every": 0} | scale.knee_schedule_options(steps) | extra


def _base_model_part(scale: Scale, experiment: str, model: str, n_facts: int, seed: int, steps: int) -> Part:
    """A FullFT stage of building the facts model: `n_facts` facts of `seed` at batch 128 for `steps`
    steps, scored on 256 facts of the knee's own seed 0 (what the knee runs later start from)."""
    name = f"study-{scale.name}-{experiment}"
    data = facts_dataset(n_facts, scale.facts_choices, seed=seed)
    held_out = facts_dataset(max(scale.knee_sizes), scale.facts_choices, seed=0)
    train = {"eval_dataset": held_out, "eval_max_examples": 256, "max_steps": steps,
             "batch_size": 128, "max_length": scale.facts_max_length, "eval_points": 6, "checkpoint_every": 0}
    return Part(experiment, name, _sweep(name, model, data, train, full_lrs=[scale.pretrain_lr]), {"n_facts": n_facts})


def pretrain_part(scale: Scale, random_base: str) -> Part:
    """FullFT of the random-init facts model on facts about other names (seed 1), one pass."""
    return _base_model_part(scale, "pretrain", random_base, scale.pretrain_facts, 1, scale.pretrain_steps)


def memorise_part(scale: Scale, format_model: str) -> Part:
    """FullFT of the format-trained model on a few facts about other names (seed 2), many passes.

    A model that has never had to store a fact does not gather the name at the answer position
    (its values were unpredictable), and a low-rank update cannot build that machinery from
    scratch: in pilots LoRA then stored ~0.01-0.03 bits per parameter whatever its rank. A model
    that memorised other facts has it, as a pretrained language model has.
    """
    return _base_model_part(scale, "memorise", format_model, scale.memorise_facts, 2, scale.memorise_steps)


def facts_lr_part(scale: Scale, base_model: str) -> Part:
    """LoRA and FullFT LRs for memorisation, on the middle dataset size (rank facts_lr_rank).

    Not the smallest: an LR chosen on the smallest size's short runs need not hold on the longer
    runs of the larger sizes. The study of 2026-12-06 chose LoRA LR 0.01 on 256 facts (800 steps),
    where it stored 99% of FullFT's bits at rank 4; on 1,024 facts (3,200 steps) ranks 8-32, and on
    4,096 (12,800 steps) every rank, then spiked above their starting loss and stored nothing
    (docs/STUDY.md, section 1)."""
    n = scale.mid_knee_size
    name = f"study-{scale.name}-knee-n{n}"
    return Part("facts_lr", name,
                _sweep(name, base_model, facts_dataset(n, scale.facts_choices), _facts_train(scale, n),
                       lora_lrs=scale.facts_lora_lrs, full_lrs=scale.facts_full_lrs, ranks=[scale.facts_lr_rank]),
                {"n_facts": n, "targets": "all", "batch": scale.facts_batch})


def knee_parts(scale: Scale, base_model: str, lora_lr: float, full_lr: float) -> list[Part]:
    """FullFT and every knee rank at every dataset size, at the LRs `facts_lr_part` chose."""
    parts = []
    for n in scale.knee_sizes:
        name = f"study-{scale.name}-knee-n{n}"  # the same run folders as facts_lr_part's cells
        parts.append(Part("knee", name,
                          _sweep(name, base_model, facts_dataset(n, scale.facts_choices), _facts_train(scale, n),
                                 lora_lrs=[lora_lr], full_lrs=[full_lr], ranks=scale.knee_ranks),
                          {"n_facts": n, "targets": "all", "batch": scale.facts_batch}))
    return parts


def _lr_model(scale: Scale, facts_base: str) -> str:
    return scale.lr_model or facts_base


def _lr_train(scale: Scale, **extra) -> dict:
    return {"max_steps": scale.lr_steps, "batch_size": scale.lr_batch, "max_length": scale.lr_max_length,
            "eval_max_examples": scale.lr_eval_examples, "eval_points": scale.lr_eval_points,
            "checkpoint_every": 0} | extra


def corpus_label(corpus: str) -> str:
    return corpus.removeprefix("builtin:").split("?")[0]


def lr_parts(scale: Scale, facts_base: str) -> list[Part]:
    """FullFT and LoRA at lr_ranks (or that corpus's lr_corpus_ranks) over LR grids, on each real corpus."""
    parts = []
    for i, corpus in enumerate(scale.lr_corpora):
        ranks = scale.lr_corpus_ranks[i] if scale.lr_corpus_ranks else scale.lr_ranks
        name = f"study-{scale.name}-lr-{corpus_label(corpus)}"
        parts.append(Part("lr", name,
                          _sweep(name, _lr_model(scale, facts_base), corpus, _lr_train(scale),
                                 lora_lrs=scale.lr_lora_lrs, full_lrs=scale.lr_full_lrs, ranks=ranks),
                          {"corpus": corpus, "targets": "all", "batch": scale.lr_batch}))
    return parts


def lr_extension_part(part: Part, method: str, rank: int | None, lr: float) -> Part:
    """One more LR for a group whose best run sat at the edge of the grid (same sweep name, so
    the same folders and MLflow experiment)."""
    sweep = dict(part.sweep)
    sweep["methods"] = [method]
    sweep["ranks"] = [rank or part.sweep["ranks"][0]]
    sweep["lora_lrs" if method == "lora" else "full_lrs"] = [float(lr)]
    return Part(part.experiment, part.name, sweep, part.tags)


def layers_parts(scale: Scale, facts_base: str, facts_lora_lr: float, lr_lora_lr: float) -> list[Part]:
    """Attention-only, MLP-only and all layers at matched adapter parameter counts: on the facts
    model (capacity-bound, middle size) and on the LR model's first corpus."""
    parts = []
    n = scale.mid_knee_size
    for targets, rank in scale.facts_layer_cells:
        name = f"study-{scale.name}-knee-n{n}" + ("" if targets == "all" else f"-{targets}")
        parts.append(Part("layers", name,
                          _sweep(name, facts_base, facts_dataset(n, scale.facts_choices),
                                 _facts_train(scale, n, targets=targets), lora_lrs=[facts_lora_lr], ranks=[rank]),
                          {"model": "facts", "n_facts": n, "targets": targets, "batch": scale.facts_batch}))
    corpus = scale.lr_corpora[0]
    for targets, rank in scale.lr_layer_cells:
        name = f"study-{scale.name}-lr-{corpus_label(corpus)}" + ("" if targets == "all" else f"-{targets}")
        parts.append(Part("layers", name,
                          _sweep(name, _lr_model(scale, facts_base), corpus, _lr_train(scale, targets=targets),
                                 lora_lrs=[lr_lora_lr], ranks=[rank]),
                          {"model": "lr", "corpus": corpus, "targets": targets, "batch": scale.lr_batch}))
    return parts


def noise_parts(scale: Scale, facts_base: str, lora_lr: float, full_lr: float) -> list[Part]:
    """The LR model's first corpus, LoRA (noise_rank) and FullFT at their chosen LRs, once per seed
    (the sweep's `seeds`: one held-out split, the first seed's run is the LR sweep's own cell)."""
    corpus = scale.lr_corpora[0]
    name = f"study-{scale.name}-lr-{corpus_label(corpus)}"
    sweep = _sweep(name, _lr_model(scale, facts_base), corpus, _lr_train(scale),
                   lora_lrs=[lora_lr], full_lrs=[full_lr], ranks=[scale.noise_rank])
    sweep["base"]["seeds"] = [int(s) for s in scale.noise_seeds]
    return [Part("noise", name, sweep, {"corpus": corpus, "targets": "all", "batch": scale.lr_batch})]


def batch_parts(scale: Scale, facts_base: str, lora_lr: float, full_lr: float) -> list[Part]:
    """LoRA (batch_rank, above the knee) against FullFT on the facts model at each batch size, the
    same passes over the data, the LR scaled with the square root of the batch (Adam's rule of thumb)."""
    parts = []
    for batch in scale.batch_sizes:
        factor = math.sqrt(batch / scale.facts_batch)
        name = f"study-{scale.name}-knee-n{scale.batch_facts}" + ("" if batch == scale.facts_batch else f"-b{batch}")
        parts.append(Part("batch", name,
                          _sweep(name, facts_base, facts_dataset(scale.batch_facts, scale.facts_choices),
                                 _facts_train(scale, scale.batch_facts, batch=batch),
                                 lora_lrs=[lora_lr * factor], full_lrs=[full_lr * factor], ranks=[scale.batch_rank]),
                          {"n_facts": scale.batch_facts, "targets": "all", "batch": batch}))
    return parts


@dataclass(frozen=True)
class ChosenLrs:
    """The LRs stage 2 found (best grid LR of each, so the cell already exists) for stage 3."""

    facts_lora: float
    facts_full: float
    lr_lora: float
    lr_full: float


def stage3_parts(scale: Scale, facts_base: str, lrs: ChosenLrs, extensions: list[tuple[Part, str, int | None, float]]
                 ) -> list[Part]:
    """Everything that runs at the LRs stage 2 chose, plus one more LR for each edge group."""
    return (knee_parts(scale, facts_base, lrs.facts_lora, lrs.facts_full)
            + layers_parts(scale, facts_base, lrs.facts_lora, lrs.lr_lora)
            + noise_parts(scale, facts_base, lrs.lr_lora, lrs.lr_full)
            + batch_parts(scale, facts_base, lrs.facts_lora, lrs.facts_full)
            + [lr_extension_part(part, method, rank, lr) for part, method, rank, lr in extensions])


def edge_extension_lr(lrs: list[float], best_lr: float) -> float | None:
    """One grid step beyond the edge the best run sits at (None: the best is inside the grid)."""
    grid = sorted(set(lrs))
    if len(grid) < 2 or grid[0] < best_lr < grid[-1]:
        return None
    step = grid[1] / grid[0]
    lr = grid[0] / step if best_lr == grid[0] else grid[-1] * step
    return lr if lr < 1 else None  # a learning rate of 1 or more is no LR (TrainConfig refuses it)
