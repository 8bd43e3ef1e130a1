"""The completion-token NLL: the one function that training, evaluation and profiling use.

`completion_nll(model, batch, head=...)` runs the model and returns the summed next-token NLL
(nats) over the batch's completion tokens, plus each example's sum and token count (the paired
statistics of `evaluation.compare` need them). `train_micro_batch` is the trainer's micro-batch
step built on it: forward, loss, backward.

Two paths give the same numbers (tests/trainer/test_loss.py: equal losses and gradients to 1e-5
on CPU in every trainer mode that uses it):

- **chunked** (`head` given; the default wherever `loss_head` allows it). The plain path
  materialises logits for every position, b·s·V of them, upcast to fp32 for the loss: for
  Llama-3.2-1B at 4 × 2048 tokens that is 1.05 G logits, 4.2 GB in fp32, plus their gradient.
  Here a forward pre-hook on the output layer takes the final hidden states (exactly what the
  unembedding sees, after the last norm) and hands the layer an empty slice, so no logits are
  built inside the model. We then (1) keep only the positions whose target is a completion token
  (prompts carry no loss) and (2) walk them in chunks, computing each chunk's logits, loss and
  gradients at once and dropping the logits before the next chunk (the approach of Liger-Kernel's
  fused linear cross-entropy, Hsu et al. 2024). Peak extra memory is one chunk of fp32 logits,
  plus the precomputed gradients of the hidden states (N × H) and, when the output layer trains,
  of its weight (V × H, fp32), held from the forward to the backward. The model's own forward
  runs, so DDP's gradient-sync hooks and gradient checkpointing work unchanged.
- **full logits** (`head=None`): logits for every position, cross-entropy in fp32. Used where the
  chunked path would be wrong: an output layer with a LoRA adapter (`target_unembedding`), FSDP
  (the output weight is sharded outside its module's forward), architectures that transform the
  logits after the output layer (soft-capping, logit scales) or are not in
  `CHUNKED_MODEL_TYPES`.

Neither path adds an MoE router's load-balancing loss: transformers adds it only when `labels`
are passed and `config.output_router_logits` is true; we pass no labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from data.dataset import IGNORE_INDEX
from planner.memory import CHUNK_TOKENS, CHUNKED_MODEL_TYPES  # torch-free: the planner sizes the same loss


@dataclass(frozen=True)
class BatchNll:
    """The completion-token NLL of one batch, in nats."""

    nll_sum: torch.Tensor
    """fp32 scalar: Σ over every completion token of the batch (with gradients when grad is on)."""
    example_nll_B: torch.Tensor
    """float64, detached: each row's summed NLL (a row is one example unless packed)."""
    example_tokens_B: torch.Tensor
    """int64: each row's completion-token count."""


def next_token_targets(labels_B_T: torch.Tensor) -> torch.Tensor:
    """targets[t] = labels[t + 1] (the causal shift), IGNORE_INDEX at the last position."""
    return F.pad(labels_B_T[:, 1:], (0, 1), value=IGNORE_INDEX)


def loss_head(model: nn.Module, *, sharded: bool = False) -> tuple[nn.Linear | None, str | None]:
    """The output layer the chunked loss can use, or (None, why the full-logits path is needed).

    Args:
        model: the unwrapped model (transformers causal LM, or a peft model around one).
        sharded: parameters are sharded outside their module's forward (FSDP).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if sharded:
        return None, "FSDP shards the output weight outside its module's forward"
    if model_type not in CHUNKED_MODEL_TYPES:
        return None, f"model type {model_type!r} is not known to compute logits as lm_head(hidden) alone"
    if type(head) is not nn.Linear or head.bias is not None:
        return None, "the output layer is not a plain bias-free Linear (e.g. it carries a LoRA adapter)"
    return head, None


def completion_nll(model: nn.Module, batch, *, head: nn.Linear | None = None,
                   chunk_tokens: int | None = None, weights_B: torch.Tensor | None = None) -> BatchNll:
    """Run `model` on `batch` and return its completion-token NLL (nats), summed and per row.

    Args:
        model: the model as called in training or evaluation (wrappers included: its forward runs).
        batch: a `trainer.data.Batch` on the model's device.
        head: `loss_head(model)[0]`: the output layer, for the chunked path; None for full logits.
        chunk_tokens: completion positions per chunk on the chunked path (None: CHUNK_TOKENS).
        weights_B: a weight per row (fp32, on the model's device): `nll_sum` is then Σ_rows
            weight × row NLL, and its gradient follows; `example_nll_B` stays unweighted. RL's
            policy-gradient loss is this with the advantages as weights (trainer/rl.py).
    """
    chunk_tokens = CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    targets_B_T = batch.targets_B_T
    tokens_B = (targets_B_T != IGNORE_INDEX).sum(dim=1)
    if head is None:
        logits_B_T_V = model(**batch.inputs, use_cache=False).logits
        nll_B_T = F.cross_entropy(logits_B_T_V.float().flatten(0, 1), targets_B_T.flatten(),
                                  ignore_index=IGNORE_INDEX, reduction="none").view_as(targets_B_T)
        nll_sum = nll_B_T.sum() if weights_B is None else (nll_B_T.sum(dim=1) * weights_B).sum()
        return BatchNll(nll_sum, nll_B_T.detach().double().sum(dim=1), tokens_B)

    captured = {}

    def take_hidden(module, args):
        (hidden_B_T_H,) = args
        device = hidden_B_T_H.device.type
        # The dtype the head's matmul would have run in: autocast's, else the hidden states'.
        captured["dtype"] = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                             else hidden_B_T_H.dtype)
        captured["hidden"] = hidden_B_T_H
        return (hidden_B_T_H[:, :0],)  # the head computes no logits

    hook = head.register_forward_pre_hook(take_hidden)
    try:
        model(**batch.inputs, use_cache=False)
    finally:
        hook.remove()
    hidden_B_T_H = captured["hidden"]
    width = hidden_B_T_H.shape[1]
    positions_N = batch.loss_positions_N
    rows_N = torch.div(positions_N, width, rounding_mode="floor")
    hidden_N_H = hidden_B_T_H.flatten(0, 1).index_select(0, positions_N)
    targets_N = targets_B_T.flatten().index_select(0, positions_N)
    weights_N = None if weights_B is None else weights_B.float().index_select(0, rows_N)
    weight_V_H = head.weight
    with torch.autocast(hidden_N_H.device.type, enabled=False):  # dtypes are chosen explicitly
        if torch.is_grad_enabled() and (hidden_N_H.requires_grad or weight_V_H.requires_grad):
            nll_sum, nll_N = _ChunkedLinearCrossEntropy.apply(hidden_N_H, weight_V_H, targets_N, chunk_tokens,
                                                               captured["dtype"], weights_N)
        else:
            nll_N = _chunked_nll(hidden_N_H, weight_V_H, targets_N, chunk_tokens, captured["dtype"])
            nll_sum = nll_N.sum() if weights_N is None else (nll_N * weights_N).sum()
    example_nll_B = torch.zeros(targets_B_T.shape[0], dtype=torch.float64, device=nll_N.device)
    example_nll_B.index_add_(0, rows_N, nll_N.detach().double())
    return BatchNll(nll_sum, example_nll_B, tokens_B)


def train_micro_batch(model: nn.Module, batch, loss_scale: float, *, head: nn.Linear | None = None,
                      backward=None) -> BatchNll:
    """The trainer's micro-batch step: forward, completion NLL, backward of nll_sum × loss_scale.

    `trainer.loop.train` runs exactly this for every micro-batch; a memory or speed harness can
    call it alone (e.g. under FakeTensorMode: nothing in it reads tensor values on the host).

    Args:
        model: the model being trained (transformers causal LM, peft model, or either wrapped by
            DDP/FSDP; its own forward is called, so wrappers' hooks fire).
        batch: a `trainer.data.Batch` on the model's device (`collate(...).to(device)`).
        loss_scale: multiplier of the summed NLL before backward; the loop uses
            processes / (completion tokens of the whole optimizer step).
        head: `loss_head(model)[0]` for the chunked loss, None for the full-logits path.
        backward: `backward(loss)` runs the backward pass (the loop passes
            `accelerator.backward`); default `loss.backward()`.

    Returns:
        The batch's NLL, detached (gradients are in the parameters' `.grad`).
    """
    nll = completion_nll(model, batch, head=head)
    loss = nll.nll_sum * loss_scale
    if backward is None:
        loss.backward()
    else:
        backward(loss)
    return BatchNll(nll.nll_sum.detach(), nll.example_nll_B, nll.example_tokens_B)


def _chunk_logits(hidden_C_H, weight_V_H, compute_dtype):
    logits_C_V = (hidden_C_H.to(compute_dtype) @ weight_V_H.to(compute_dtype).T).float()
    return logits_C_V, torch.logsumexp(logits_C_V, dim=-1)


def _chunked_nll(hidden_N_H, weight_V_H, targets_N, chunk_tokens, compute_dtype) -> torch.Tensor:
    """Per-position NLL (fp32), without gradients, one chunk of logits at a time."""
    nll_N = torch.empty(targets_N.shape[0], dtype=torch.float32, device=hidden_N_H.device)
    for start in range(0, targets_N.shape[0], chunk_tokens):
        end = start + chunk_tokens
        logits_C_V, logsumexp_C = _chunk_logits(hidden_N_H[start:end], weight_V_H, compute_dtype)
        nll_N[start:end] = logsumexp_C - logits_C_V.gather(1, targets_N[start:end, None]).squeeze(1)
    return nll_N


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """(Σ_i w_i · −log softmax(h_i Wᵀ)[y_i], the unweighted per-position terms); gradients computed
    in the forward. w_i = 1 when `weights_N` is None.

    The per-position terms are a non-differentiable second output (for per-example sums); the
    gradient flows through the sum only.
    """

    @staticmethod
    def forward(ctx, hidden_N_H, weight_V_H, targets_N, chunk_tokens, compute_dtype, weights_N=None):
        weight = weight_V_H.to(compute_dtype)
        grad_hidden_N_H = torch.empty_like(hidden_N_H) if ctx.needs_input_grad[0] else None
        grad_weight_V_H = torch.zeros_like(weight_V_H, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        nll_N = torch.empty(targets_N.shape[0], dtype=torch.float32, device=hidden_N_H.device)
        rows = torch.arange(min(chunk_tokens, targets_N.shape[0]), device=hidden_N_H.device)
        for start in range(0, targets_N.shape[0], chunk_tokens):
            end = start + chunk_tokens
            h_C_H, y_C = hidden_N_H[start:end], targets_N[start:end]
            logits_C_V, logsumexp_C = _chunk_logits(h_C_H, weight, compute_dtype)
            nll_N[start:end] = logsumexp_C - logits_C_V.gather(1, y_C[:, None]).squeeze(1)
            # d nll / d logits = softmax − onehot(y), reusing the logits buffer in place.
            grad_logits_C_V = logits_C_V.sub_(logsumexp_C[:, None]).exp_()
            grad_logits_C_V[rows[: y_C.shape[0]], y_C] -= 1.0
            if weights_N is not None:
                grad_logits_C_V.mul_(weights_N[start:end, None])
            grad_logits_C_V = grad_logits_C_V.to(compute_dtype)
            if grad_hidden_N_H is not None:
                grad_hidden_N_H[start:end] = grad_logits_C_V @ weight
            if grad_weight_V_H is not None:
                grad_weight_V_H.addmm_(grad_logits_C_V.T.float(), h_C_H.float())
        ctx.save_for_backward(
            grad_hidden_N_H if grad_hidden_N_H is not None else torch.empty(0),
            grad_weight_V_H if grad_weight_V_H is not None else torch.empty(0),
        )
        ctx.weight_dtype = weight_V_H.dtype
        ctx.mark_non_differentiable(nll_N)
        return (nll_N.sum() if weights_N is None else (nll_N * weights_N).sum()), nll_N

    @staticmethod
    def backward(ctx, grad_sum, _grad_per_position):
        grad_hidden_N_H, grad_weight_V_H = ctx.saved_tensors
        grad_hidden = grad_hidden_N_H * grad_sum.to(grad_hidden_N_H.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_weight_V_H * grad_sum).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None
