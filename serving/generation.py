"""One `generate` call for a batch of requests that may each use a different adapter.

peft's mixed-batch LoRA (`adapter_names=[...]` in `generate`, "__base__" for the bare model)
routes each row through its own adapter, so a batch never has to be split by adapter. What
`generate` cannot do per row, two small hooks do:

- `RowSampler` (a logits processor) applies each row's own temperature and top-p, and forces the
  arg-max token on greedy rows, so greedy and sampled requests share one batch;
- `RowStopper` (a stopping criterion) ends each row at its own `max_tokens` or stop string and
  streams its new text, while `generate` keeps handling the end-of-sequence token.

torch and transformers are imported when a batch runs, never at import time here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in adapter_names


@dataclass
class GenerationRequest:
    """One prompt, already tokenised, and how to continue it.

    Attributes:
        prompt_ids: token ids of the prompt (special tokens included as the tokenizer adds them).
        adapter: the adapter name, or BASE_ADAPTER for the base model.
        max_tokens: new tokens at most.
        temperature: 0 means greedy (arg-max); otherwise logits are divided by it.
        top_p: nucleus sampling mass in (0, 1]; 1 keeps every token.
        stop: strings that end the completion; the text returned stops before the first one.
        on_text: called from the generation thread with each new piece of text (streaming).
    """

    prompt_ids: list[int]
    adapter: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None


@dataclass
class GenerationResult:
    """What one row produced.

    Attributes:
        text: the completion, cut before the first stop string.
        finish_reason: "stop" (end token or stop string) or "length" (max_tokens reached).
        prompt_tokens / completion_tokens: usage counts; completion tokens run up to and including
            the end token or the token that completed a stop string.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _RowState:
    done_at: int | None = None  # generated-token count when the row finished
    stopped_by_string: bool = False
    emitted: int = 0  # characters already passed to on_text
    text: str = field(default="")


class Codec:
    """The tokenizer behind a lock: Rust tokenizers raise "Already borrowed" when two threads use
    one instance at once, and the HTTP event loop encodes while the generation thread decodes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> str:
        with self._lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _make_row_sampler(requests: list[GenerationRequest]):
    import torch
    from transformers import LogitsProcessor

    temperature_B = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in requests])
    top_p_B = torch.tensor([r.top_p for r in requests])
    greedy_B = torch.tensor([r.temperature <= 0 for r in requests])

    class RowSampler(LogitsProcessor):
        """Per-row temperature and top-p; greedy rows keep only their arg-max token."""

        def __call__(self, input_ids, scores_BV):
            scores_BV = scores_BV / temperature_B.to(scores_BV.device, scores_BV.dtype)[:, None]
            # Top-p (Holtzman et al. 2020): drop the tail whose probability mass lies beyond p,
            # always keeping the most likely token.
            sorted_BV, order_BV = torch.sort(scores_BV, descending=True, dim=-1)
            cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted_BV = (cum_BV - sorted_BV.softmax(dim=-1)) >= top_p_B.to(scores_BV.device)[:, None]
            drop_BV = drop_sorted_BV.scatter(1, order_BV, drop_sorted_BV)
            scores_BV = scores_BV.masked_fill(drop_BV, float("-inf"))
            greedy = greedy_B.to(scores_BV.device)
            if greedy.any():
                best_B = scores_BV.argmax(dim=-1)
                only_best_BV = torch.full_like(scores_BV, float("-inf"))
                only_best_BV.scatter_(1, best_B[:, None], 0.0)
                scores_BV = torch.where(greedy[:, None], only_best_BV, scores_BV)
            return scores_BV

    return RowSampler()


def _make_row_stopper(
    requests: list[GenerationRequest],
    states: list[_RowState],
    prompt_len: int,
    codec: Codec,
    eos_set: set[int],
):
    import torch
    from transformers import StoppingCriteria

    hold_back = [max((len(s) for s in r.stop), default=1) - 1 for r in requests]

    class RowStopper(StoppingCriteria):
        """Ends a row at its max_tokens or first stop string; streams text that is final."""

        def __call__(self, input_ids, scores, **kwargs):
            n_new = input_ids.shape[1] - prompt_len
            done = []
            for row, (request, state) in enumerate(zip(requests, states, strict=True)):
                if state.done_at is not None:
                    done.append(True)
                    continue
                if request.stop or request.on_text:
                    text, found = _cut_at_stop(
                        codec.decode(input_ids[row, prompt_len:].tolist()), request.stop
                    )
                    state.text = text
                    if found:
                        state.stopped_by_string = True
                if (
                    state.stopped_by_string
                    or n_new >= request.max_tokens
                    or int(input_ids[row, -1]) in eos_set
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
    model, codec: Codec, requests: list[GenerationRequest], mixed: bool = True, stacked=None
) -> list[GenerationResult]:
    """Continue every prompt in one left-padded `generate` call, each row with its own adapter.

    `model` is a peft `PeftModel` when any adapter is loaded, or the bare transformers model when
    none is. With `mixed`, rows pick their adapter through `adapter_names`, or, when `stacked` (a
    `serving.stacked_lora.StackedLoRA`) is given, the batch mixes two or more adapters (the base
    counts as one) and the model's LoRA is plain, through the stacked weights (two batched matmuls
    per layer instead of peft's loop over adapters). Without `mixed` (peft cannot mix a model
    holding MoE expert LoRA, `target_parameters`), every row must name the same adapter, which is
    made the active one.
    """
    import contextlib

    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    tokenizer = codec.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = model.generation_config.eos_token_id
    if eos_ids is None:
        eos_ids = tokenizer.eos_token_id
    eos_set = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])

    prompt_len = max(len(r.prompt_ids) for r in requests)
    input_ids_BT = torch.full((len(requests), prompt_len), pad_id, dtype=torch.long)
    attention_mask_BT = torch.zeros((len(requests), prompt_len), dtype=torch.long)
    for row, request in enumerate(requests):
        n = len(request.prompt_ids)
        input_ids_BT[row, prompt_len - n :] = torch.tensor(request.prompt_ids)
        attention_mask_BT[row, prompt_len - n :] = 1
    device = next(model.parameters()).device
    states = [_RowState() for _ in requests]

    kwargs = dict(
        input_ids=input_ids_BT.to(device),
        attention_mask=attention_mask_BT.to(device),
        max_new_tokens=max(r.max_tokens for r in requests),
        do_sample=any(r.temperature > 0 for r in requests),
        pad_token_id=pad_id,
        eos_token_id=list(eos_set),
        stopping_criteria=StoppingCriteriaList(
            [_make_row_stopper(requests, states, prompt_len, codec, eos_set)]
        ),
    )
    if kwargs["do_sample"]:
        # The model's own sampling defaults (top_k=50, a checkpoint's temperature) are switched
        # off so that RowSampler alone decides.
        kwargs.update(
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            logits_processor=LogitsProcessorList([_make_row_sampler(requests)]),
        )
    adapters = {r.adapter for r in requests}
    context = contextlib.nullcontext()
    if not getattr(model, "peft_config", None):
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
    with torch.inference_mode(), context:
        output_BT = model.generate(**kwargs)

    results = []
    for row, (request, state) in enumerate(zip(requests, states, strict=True)):
        new_ids = output_BT[row, prompt_len:].tolist()[: request.max_tokens]
        if state.done_at is not None:
            new_ids = new_ids[: state.done_at]
        eos_at = next((i for i, t in enumerate(new_ids) if t in eos_set), None)
        if eos_at is not None:
            new_ids = new_ids[: eos_at + 1]
        text, found = _cut_at_stop(codec.decode(new_ids), request.stop)
        finish = "stop" if (found or eos_at is not None) else "length"
        if request.on_text:
            if len(text) > state.emitted:
                request.on_text(text[state.emitted :])
        results.append(GenerationResult(text, finish, len(request.prompt_ids), len(new_ids)))
    return results
