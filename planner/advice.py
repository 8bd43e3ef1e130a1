"""Hyper-parameter advice for LoRA: learning rate, alpha and a batch-size warning.

- LoRA's optimal LR is ~10× FullFT's, for SFT and RL ("LoRA Without Regret", Thinking Machines
  2025; tinker-cookbook `hyperparam_utils.get_lora_lr_over_full_finetune_lr` returns 10).
  Runs under ~100 steps: ~15× (the blog's anecdotal observation).
- Without a FullFT LR, tinker-cookbook's `get_lr`: 5e-5 × 10 × (2000 / hidden_size)^P, with P fitted
  per family (0.781 Llama, 0.0775 Qwen). Other families are not guessed.
- α = 32 with the 1/r scaling makes the optimal LR nearly rank-independent (blog; peft default init).
- Batch size: LoRA pays a loss penalty that grows with the batch and does not shrink with rank;
  at 32 sequences it is small (blog); TRL advises an effective batch < 32; keep it <= 128.

The short-run multiplier is the study's measurement when planner/calibration.json holds one
(`lowregret study`, docs/STUDY.md), else the 15× prior; the advice says which it used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from data.errors import UserError
from planner import calibration as calibration_mod
from planner.shapes import ModelShape

LORA_OVER_FULLFT_LR = 10.0  # blog; tinker-cookbook get_lora_lr_over_full_finetune_lr
SHORT_RUN_LORA_OVER_FULLFT_LR = 15.0  # blog, anecdotal: runs under ~100 steps (the prior)
SHORT_RUN_PRIOR_SOURCE = "LoRA Without Regret (anecdotal, runs under ~100 steps)"
SHORT_RUN_STEPS = 100
TINKER_BASE_FULLFT_LR = 5e-5  # tinker-cookbook hyperparam_utils.get_lr
TINKER_REFERENCE_HIDDEN = 2000  # ... (2000 / hidden_size) ** exponent
# tinker-cookbook hyperparam_utils.get_lr: exponents fitted on Llama-3 and Qwen3 LR sweeps.
LR_EXPONENT_BY_FAMILY: dict[str, float] = {"llama": 0.781, "qwen": 0.0775}
LORA_ALPHA = 32  # blog + peft's default init: W' = W + (α/r)·B·A
BATCH_SMALL_PENALTY_ABOVE = 32  # blog: small gap at 32; TRL: effective batch < 32
BATCH_STRONG_WARNING_ABOVE = 128  # seed notes: keep it <= 128


@dataclass(frozen=True)
class Advice:
    """LoRA hyper-parameters and warnings.

    Attributes:
        lora_lr: the suggested LoRA learning rate (constant schedule, no warmup, as in the blog);
            None when there is no FullFT LR to scale and no fitted rule for the model family.
        lr_rule: how it was computed, or what is missing, in words.
        lr_multiplier: LoRA LR / FullFT LR used (10; for short runs the study's measurement, else 15).
        lr_multiplier_source: where `lr_multiplier` comes from (prior or our measurement).
        prior_lr_multiplier: the literature prior for this run length (10, or 15 for short runs).
        anecdotal: True when the 15× short-run prior was used.
        batch_level: `ok`, `small-penalty` or `strong-warning`.
        messages: readable advice, one sentence each.
    """

    lora_lr: float | None
    lr_rule: str
    lr_multiplier: float
    lr_multiplier_source: str
    prior_lr_multiplier: float
    fullft_lr: float | None
    family: str | None
    anecdotal: bool
    alpha: int
    effective_batch: int
    batch_level: str
    batch_thresholds: tuple[int, int]
    messages: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def model_family(model_type: str) -> str | None:
    """`llama` or `qwen` for the families tinker-cookbook fitted LR exponents on, else None."""
    model_type = model_type.lower()
    return next((f for f in LR_EXPONENT_BY_FAMILY if model_type.startswith(f)), None)


def batch_level(effective_batch: int) -> str:
    if effective_batch > BATCH_STRONG_WARNING_ABOVE:
        return "strong-warning"
    if effective_batch > BATCH_SMALL_PENALTY_ABOVE:
        return "small-penalty"
    return "ok"


def short_run_multiplier_constant(calibration: dict | None = None) -> calibration_mod.Constant:
    """LoRA LR / FullFT LR for runs under SHORT_RUN_STEPS: the study's measurement when the
    calibration file has one, else the 15× prior (`calibration`: see `planner.calibration.constant`)."""
    return calibration_mod.constant("short_run_lora_over_fullft_lr", SHORT_RUN_LORA_OVER_FULLFT_LR,
                                    SHORT_RUN_PRIOR_SOURCE, calibration)


def advise(shape: ModelShape, effective_batch: int, fullft_lr: float | None = None, steps: int | None = None,
           calibration: dict | None = None) -> Advice:
    """Suggest the LoRA LR, α and warn about the batch size. Without a FullFT LR, a family with no
    fitted exponent gets no LR (`lora_lr` None) and a message saying what to pass; the rest of the
    advice stands.

    Args:
        calibration: a calibration record (None: the packaged planner/calibration.json; {}: priors only).

    Raises:
        UserError: a non-positive FullFT LR.
    """
    short = steps is not None and steps < SHORT_RUN_STEPS
    if short:
        chosen = short_run_multiplier_constant(calibration)
        multiplier, multiplier_source, prior_multiplier = chosen.value, chosen.source, chosen.prior
        anecdotal = not chosen.measured
    else:
        multiplier, prior_multiplier, anecdotal = LORA_OVER_FULLFT_LR, LORA_OVER_FULLFT_LR, False
        multiplier_source = "literature prior: LoRA Without Regret; tinker-cookbook get_lora_lr_over_full_finetune_lr"
    family = model_family(shape.model_type)
    messages = []
    if fullft_lr is not None:
        if fullft_lr <= 0:
            raise UserError(f"--fullft-lr must be positive, got {fullft_lr}.")
        lora_lr = fullft_lr * multiplier
        rule = f"{multiplier:.3g} × the FullFT LR {fullft_lr:g}"
    elif family is None:
        lora_lr = None
        rule = (f"not computed: tinker-cookbook fits its LR rule only on Llama and Qwen, not model_type "
                f"{shape.model_type!r}; pass the FullFT learning rate you would use with --fullft-lr and the "
                f"planner multiplies it by {multiplier:.3g}")
    else:
        exponent = LR_EXPONENT_BY_FAMILY[family]
        base = TINKER_BASE_FULLFT_LR * (TINKER_REFERENCE_HIDDEN / shape.hidden_size) ** exponent
        lora_lr = base * multiplier
        rule = (f"tinker-cookbook: 5e-5 × {multiplier:.3g} × (2000/{shape.hidden_size})^{exponent} "
                f"({family} family from model_type {shape.model_type!r})")
    if lora_lr is None:
        messages.append(f"LoRA LR {rule}.")
    else:
        messages.append(f"LoRA LR {lora_lr:.3g} = {rule}; constant schedule, no warmup.")
    if fullft_lr is None and family is not None and family not in shape.name.lower():
        messages.append(f"tinker-cookbook fitted the exponent on {family} checkpoints by name; {shape.name} only "
                        "shares the architecture, so treat the LR as a starting point or pass --fullft-lr.")
    if short and anecdotal:
        messages.append(f"The run has {steps} steps (< {SHORT_RUN_STEPS}): the 15× multiplier is anecdotal (blog).")
    elif short:
        messages.append(f"The run has {steps} steps (< {SHORT_RUN_STEPS}): LoRA/FullFT LR {multiplier:.3g}× is "
                        f"{multiplier_source}; the prior is {prior_multiplier:g}× ({SHORT_RUN_PRIOR_SOURCE}).")
    elif steps is None:
        messages.append(f"Number of steps unknown: 10× assumed; runs under {SHORT_RUN_STEPS} steps may prefer ~15×.")
    messages.append(f"alpha = {LORA_ALPHA} (with the 1/r scaling the best LR barely moves with rank).")
    level = batch_level(effective_batch)
    if level == "strong-warning":
        messages.append(f"Effective batch {effective_batch} > {BATCH_STRONG_WARNING_ABOVE}: LoRA's loss penalty "
                        "grows with batch size and rank does not remove it; use a smaller batch.")
    elif level == "small-penalty":
        messages.append(f"Effective batch {effective_batch} > {BATCH_SMALL_PENALTY_ABOVE}: expect a small LoRA "
                        f"penalty that grows with batch size (strong above {BATCH_STRONG_WARNING_ABOVE}).")
    else:
        messages.append(f"Effective batch {effective_batch} <= {BATCH_SMALL_PENALTY_ABOVE}: LoRA's batch penalty is small.")
    return Advice(lora_lr, rule, multiplier, multiplier_source, prior_multiplier, fullft_lr, family, anecdotal,
                  LORA_ALPHA, effective_batch, level, (BATCH_SMALL_PENALTY_ABOVE, BATCH_STRONG_WARNING_ABOVE),
                  tuple(messages))


# Configured and advised LoRA LRs further apart than this (x) are called a disagreement.
LR_DISAGREEMENT_FACTOR = 1.1


def lr_disagreement(configured_lora_lr: float, advice: Advice) -> str | None:
    """A warning when the LoRA LR a run is configured with is not the one the plan advises, else None
    (also None when the plan gives no LR: a family without a fitted rule and no FullFT LR)."""
    if advice.lora_lr is None:
        return None
    ratio = configured_lora_lr / advice.lora_lr
    if max(ratio, 1 / ratio) <= LR_DISAGREEMENT_FACTOR:
        return None
    return (f"the configured LoRA LR {configured_lora_lr:.3g} is {ratio:.2f}x the plan's advice {advice.lora_lr:.3g} "
            f"({advice.lr_rule}); the run uses the configured LR.")
