"""The one generation helper: one `generate` call for a batch of requests, each with its own
sampling, stop rule and (when serving) adapter. RL's sampling and held-out evaluation, the MLflow
pyfunc model and the server all generate through `generate_batch`; prompts come from the one
renderer (`data.render.Renderer.prompt`), and so do the end tokens (`Renderer.stop_ids`).

peft's mixed-batch LoRA (`adapter_names=[...]` in `generate`, "__base__" for the bare model)
routes each row through its own adapter, so a batch never has to be split by adapter. What
`generate` cannot do per row, two small hooks do:

- `RowSampler` (a logits processor) applies each row's own temperature and top-p, forces the
  arg-max token on greedy rows, and on seeded rows the token drawn by inverse CDF at a uniform
  hashed from (row seed, token position) alone, so greedy, sampled and seeded requests share one
  batch, and a seeded row's completion depends neither on the other rows of its batch nor on the
  process that generates it (RL's episodes: the same on 1 or N processes, and on resume);
- `RowStopper` (a stopping criterion) ends each row at its own `max_tokens` or stop string and
  streams its new text, while `generate` keeps handling the end-of-sequence token.

torch and transformers are imported when a batch runs, never at import time here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in adapter_names


@dataclass
class GenerationRequest:
    """One prompt, already tokenised, and how to continue it.

    Attributes:
        prompt_ids: token ids of the prompt (`data.render.Renderer.prompt`).
        max_tokens: new tokens at most.
        adapter: the adapter name, BASE_ADAPTER for the base model of a served PeftModel, or None
            (every row of the batch): the model as it is, its active adapter if any.
        temperature: 0 means greedy (arg-max); otherwise logits are divided by it.
        top_p: nucleus sampling mass in (0, 1]; 1 keeps every token.
        seed: with temperature > 0, draw each token from the row's own hashed uniforms (see the
            module docstring) instead of the batch's shared random stream.
        stop: strings that end the completion; the text returned stops before the first one.
        on_text: called from the generation thread with each new piece of text (streaming).
    """

    prompt_ids: list[int] | tuple[int, ...]
    max_tokens: int
    adapter: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None


@dataclass
class GenerationResult:
    """What one row produced.

    Attributes:
        text: the completion, cut before the first stop string (special tokens dropped).
        finish_reason: "stop" (end token or stop string) or "length" (max_tokens reached).
        prompt_tokens / completion_tokens: usage counts; completion tokens run up to and including
            the end token or the token that completed a stop string.
        completion_ids: those completion tokens.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    completion_ids: list[int] = field(default_factory=list)


@dataclass
class _RowState:
    done_at: int | None = None  # generated-token count when the row finished
    stopped_by_string: bool = False
    emitted: int = 0  # characters already passed to on_text
    text: str = field(default="")


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def hashed_seed(*values: int) -> int:
    """A 63-bit seed from integers (sha256: distinct tuples give unrelated streams)."""
    digest = hashlib.sha256(":".join(map(str, values)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def row_sampler(requests: list[GenerationRequest], prompt_len: int):
    import torch
    from transformers import LogitsProcessor

    temperature_B = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in requests])
    top_p_B = torch.tensor([r.top_p for r in requests])
    nucleus_B = top_p_B < 1  # top-p = 1 keeps every token (no rounding may drop a tail token)
    greedy_B = torch.tensor([r.temperature <= 0 for r in requests])
    seeded = [row for row, r in enumerate(requests) if r.temperature > 0 and r.seed is not None]
    seeds = [requests[row].seed for row in seeded]

    class RowSampler(LogitsProcessor):
        """Per-row temperature and top-p; greedy rows keep only their arg-max token, seeded rows only
        their seeded draw."""

        def __call__(self, input_ids, scores_BV):
            device = scores_BV.device
            scores_BV = scores_BV / temperature_B.to(device, scores_BV.dtype)[:, None]
            if nucleus_B.any():
                # Top-p (Holtzman et al. 2020): drop the tail whose probability mass lies beyond p,
                # always keeping the most likely token.
                sorted_BV, order_BV = torch.sort(scores_BV, descending=True, dim=-1)
                probs_BV = sorted_BV.softmax(dim=-1)
                drop_sorted_BV = ((probs_BV.cumsum(dim=-1) - probs_BV) >= top_p_B.to(device)[:, None]) \
                    & nucleus_B.to(device)[:, None]
                drop_BV = drop_sorted_BV.scatter(1, order_BV, drop_sorted_BV)
                scores_BV = scores_BV.masked_fill(drop_BV, float("-inf"))
            chosen_B = torch.full((len(requests),), -1, dtype=torch.long, device=device)
            greedy = greedy_B.to(device)
            if greedy.any():
                chosen_B = torch.where(greedy, scores_BV.argmax(dim=-1), chosen_B)
            if seeded:
                # Inverse CDF of softmax(scores) at the row's uniform for this token position: the
                # token whose CDF step holds u x total, the first with cdf > u x total (a zero-
                # probability token has no step, so it is never drawn).
                position = input_ids.shape[1] - prompt_len
                rows = torch.tensor(seeded, device=device)
                uniform_S = torch.tensor([(hashed_seed(seed, position) >> 10) / 2**53 for seed in seeds],
                                         dtype=torch.float64, device=device)  # in [0, 1)
                cdf_S_V = torch.softmax(scores_BV[rows].float(), dim=-1).double().cumsum(dim=-1)
                drawn_S = torch.searchsorted(cdf_S_V, (uniform_S * cdf_S_V[:, -1])[:, None], right=True)
                chosen_B[rows] = drawn_S[:, 0].clamp(max=scores_BV.shape[-1] - 1)
            if (chosen_B >= 0).any():
                only_BV = torch.full_like(scores_BV, float("-inf")).scatter_(1, chosen_B.clamp(min=0)[:, None], 0.0)
                scores_BV = torch.where((chosen_B >= 0)[:, None], only_BV, scores_BV)
            return scores_BV

    return RowSampler()


def _make_row_stopper(
    requests: list[GenerationRequest],
    states: list[_RowState],
    prompt_len: int,
    renderer,
    eos_set: set[int],
):
    import torch
    from transformers import StoppingCriteria

    hold_back = [max((len(s) for s in r.stop), default=1) - 1 for r in requests]

    class RowStopper(StoppingCriteria):
        """Ends a row at its max_tokens or first stop string; streams text that is final."""

        def __call__(self, input_ids, scores, **kwargs):
            n_new = input_ids.shape[1] - prompt_len
            last = input_ids[:, -1].tolist()
            done = []
            for row, (request, state) in enumerate(zip(requests, states, strict=True)):
                if state.done_at is not None:
                    done.append(True)
                    continue
                if request.stop or request.on_text:
                    text, found = _cut_at_stop(
                        renderer.decode(input_ids[row, prompt_len:].tolist()), request.stop
                    )
                    state.text = text
                    if found:
                        state.stopped_by_string = True
                if (
                    state.stopped_by_string
                    or n_new >= request.max_tokens
                    or last[row] in eos_set
                ):
                    state.done_at = n_new
                if request.on_text:
                    # Hold back what could be the start of a stop string or a split UTF-8 character.
                    final = state.done_at is not None
                    end = len(state.text) if final else max(state.emitted, len(state.text) - hold_back[row])
                    while not final and end > state.emitted and state.text[end - 1] == "\ufffd":
                        end -= 1
                    if end > state.emitted:
                        request.on_text(state.text[state.emitted : end])
                        state.emitted = end
                done.append(state.done_at is not None)
            return torch.tensor(done, device=input_ids.device)

    return RowStopper()


def generate_batch(
    model, renderer, requests: list[GenerationRequest], *, mixed: bool = True, stacked=None, synced: bool = False
) -> list[GenerationResult]:
    """Continue every prompt in one left-padded `generate` call, each row with its own sampling.

    `model` is a transformers model, a peft `PeftModel`, or either sharded by FSDP2. Requests whose
    `adapter` is None use the model as it is (training: RL's policy). Otherwise `model` is the
    server's: a `PeftModel` when any adapter is loaded, or the bare transformers model when none is.
    With `mixed`, rows pick their adapter through `adapter_names`, or, when `stacked` (a
    `serving.stacked_lora.StackedLoRA`) is given, the batch mixes two or more adapters (the base
    counts as one) and the model's LoRA is plain, through the stacked weights (two batched matmuls
    per layer instead of peft's loop over adapters). Without `mixed` (peft cannot mix a model
    holding MoE expert LoRA, `target_parameters`), every row must name the same adapter, which is
    made the active one.

    Args:
        renderer: the tokenizer's `data.render.Renderer` (pad id, end tokens, decoding).
        synced: every process runs as many forwards as the longest (transformers' `synced_gpus`,
            what FSDP's all-gathers need).
    """
    import contextlib

    import torch
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    pad_id = renderer.pad_id
    eos_ids = renderer.stop_ids(getattr(model, "generation_config", None))
    eos_set = set(eos_ids)

    prompt_len = max(len(r.prompt_ids) for r in requests)
    input_ids_BT = torch.full((len(requests), prompt_len), pad_id, dtype=torch.long)
    attention_mask_BT = torch.zeros((len(requests), prompt_len), dtype=torch.long)
    for row, request in enumerate(requests):
        n = len(request.prompt_ids)
        input_ids_BT[row, prompt_len - n :] = torch.tensor(request.prompt_ids)
        attention_mask_BT[row, prompt_len - n :] = 1
    device = next(model.parameters()).device
    states = [_RowState() for _ in requests]

    # Rows drawn from the batch's random stream need sampling; greedy and seeded rows leave one
    # finite token each (RowSampler), which arg-max decoding and sampling both pick. The model's
    # own sampling defaults (top_k=50, a checkpoint's temperature) are switched off so that
    # RowSampler alone decides.
    sampling = any(r.temperature > 0 and r.seed is None for r in requests)
    needs_sampler = any(r.temperature > 0 or r.top_p < 1 for r in requests)
    generation = GenerationConfig(max_new_tokens=max(r.max_tokens for r in requests), do_sample=sampling,
                                  pad_token_id=pad_id, eos_token_id=eos_ids,
                                  **(dict(temperature=1.0, top_p=1.0, top_k=0) if sampling else {}))
    kwargs = dict(
        input_ids=input_ids_BT.to(device),
        attention_mask=attention_mask_BT.to(device),
        generation_config=generation,
        stopping_criteria=StoppingCriteriaList(
            [_make_row_stopper(requests, states, prompt_len, renderer, eos_set)]
        ),
        logits_processor=LogitsProcessorList([row_sampler(requests, prompt_len)] if needs_sampler else []),
        synced_gpus=synced,
    )
    adapters = {r.adapter for r in requests}
    context = contextlib.nullcontext()
    if adapters == {None}:
        pass  # the model as it is
    elif None in adapters:
        raise ValueError("a batch names an adapter on every row or on none")
    elif not getattr(model, "peft_config", None):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()  # every adapter removed: the emptied LoRA layers pass through
    elif mixed and stacked is not None and len(adapters) > 1 and stacked.supports(model):
        context = stacked.rows(model, [r.adapter for r in requests], BASE_ADAPTER)
    elif mixed:
        # Always explicit: without adapter_names a PeftModel would apply its active adapter to base rows.
        kwargs["adapter_names"] = [r.adapter for r in requests]
    elif len(adapters) != 1:
        raise ValueError(f"an unmixed batch must use one adapter, got {sorted(adapters)}")
    elif BASE_ADAPTER in adapters:
        context = model.disable_adapter()
    else:
        model.set_adapter(adapters.pop())
    # FSDP2's parameter all-gathers run under no_grad, not inference mode.
    with torch.no_grad() if synced else torch.inference_mode(), context:
        output_BT = model.generate(**kwargs)

    results = []
    for row, (request, state) in enumerate(zip(requests, states, strict=True)):
        new_ids = output_BT[row, prompt_len:].tolist()[: request.max_tokens]
        if state.done_at is not None:
            new_ids = new_ids[: state.done_at]
        eos_at = next((i for i, t in enumerate(new_ids) if t in eos_set), None)
        if eos_at is not None:
            new_ids = new_ids[: eos_at + 1]  # what follows the end token is padding
        text, found = _cut_at_stop(renderer.decode(new_ids), request.stop)
        finish = "stop" if (found or eos_at is not None) else "length"
        if request.on_text:
            if len(text) > state.emitted:
                request.on_text(text[state.emitted :])
        results.append(GenerationResult(text, finish, len(request.prompt_ids), len(new_ids), new_ids))
    return results
