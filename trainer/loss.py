"""Completion-token cross-entropy straight from hidden states, in chunks.

The plain path (`model(..., labels=...)`) materialises logits for every position, b·s·V of them,
and upcasts them to fp32 for the loss: for Llama-3.2-1B at 4 × 2048 tokens that is 1.05 G logits,
4.2 GB in fp32, plus their gradient. Here we (1) keep only the positions whose next token is a
completion token (prompts carry no loss), and (2) walk those positions in chunks, computing each
chunk's logits, loss and gradients at once and dropping the logits before the next chunk
(the approach of Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024). Peak extra memory
is one chunk of fp32 logits instead of all of them; the FLOPs are the same as the plain path's
unembedding matmuls, minus the prompt positions.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i −log softmax(h_i Wᵀ)[y_i], with gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden_N_H, weight_V_H, targets_N, chunk_tokens):
        compute_dtype = hidden_N_H.dtype
        weight = weight_V_H.to(compute_dtype)
        need_weight_grad = ctx.needs_input_grad[1]
        grad_hidden_N_H = torch.empty_like(hidden_N_H) if ctx.needs_input_grad[0] else None
        grad_weight_V_H = torch.zeros_like(weight_V_H, dtype=torch.float32) if need_weight_grad else None
        nll_sum = torch.zeros((), dtype=torch.float32, device=hidden_N_H.device)
        for start in range(0, hidden_N_H.shape[0], chunk_tokens):
            h_C_H = hidden_N_H[start : start + chunk_tokens]
            y_C = targets_N[start : start + chunk_tokens]
            logits_C_V = (h_C_H @ weight.T).float()
            logsumexp_C = torch.logsumexp(logits_C_V, dim=-1)
            nll_sum += (logsumexp_C - logits_C_V.gather(1, y_C[:, None]).squeeze(1)).sum()
            # d nll / d logits = softmax − onehot(y), reusing the logits buffer in place.
            grad_logits_C_V = logits_C_V.sub_(logsumexp_C[:, None]).exp_()
            grad_logits_C_V[torch.arange(y_C.shape[0], device=y_C.device), y_C] -= 1.0
            grad_logits_C_V = grad_logits_C_V.to(compute_dtype)
            if grad_hidden_N_H is not None:
                grad_hidden_N_H[start : start + chunk_tokens] = grad_logits_C_V @ weight
            if grad_weight_V_H is not None:
                grad_weight_V_H.addmm_(grad_logits_C_V.T.float(), h_C_H.float())
        ctx.save_for_backward(
            grad_hidden_N_H if grad_hidden_N_H is not None else torch.empty(0),
            grad_weight_V_H if grad_weight_V_H is not None else torch.empty(0),
        )
        ctx.weight_dtype = weight_V_H.dtype
        return nll_sum

    @staticmethod
    def backward(ctx, grad_nll):
        grad_hidden_N_H, grad_weight_V_H = ctx.saved_tensors
        grad_hidden = grad_hidden_N_H * grad_nll.to(grad_hidden_N_H.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_weight_V_H * grad_nll).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def completion_nll_sum(
    hidden_B_T_H: torch.Tensor,
    unembed_weight_V_H: torch.Tensor,
    labels_B_T: torch.Tensor,
    chunk_tokens: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (nats) over completion tokens, and how many there were.

    Position t predicts labels[t + 1] (the usual causal shift). The sum, not the mean, is
    returned so that gradient accumulation can weight micro-batches by their token counts.

    Args:
        hidden_B_T_H: the final hidden states (after the last norm).
        unembed_weight_V_H: the output projection's weight (lm_head, or the tied embedding).
        labels_B_T: token ids, IGNORE_INDEX (-100) where no loss is taken.
        chunk_tokens: positions per chunk; bounds the fp32 logits held at once to
            chunk_tokens × V × 4 bytes.

    Returns:
        (nll_sum, token_count): a float32 scalar with gradients, and an int64 scalar.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    targets_B_T = labels_B_T[:, 1:]
    keep_B_T = targets_B_T != IGNORE_INDEX
    hidden_N_H = hidden_B_T_H[:, :-1][keep_B_T]
    targets_N = targets_B_T[keep_B_T]
    token_count = keep_B_T.sum()
    if targets_N.numel() == 0:
        # Keep the graph connected so backward() works on a batch with no completion token.
        return hidden_B_T_H.sum() * 0.0, token_count
    nll_sum = _ChunkedLinearCrossEntropy.apply(hidden_N_H, unembed_weight_V_H, targets_N, chunk_tokens)
    return nll_sum, token_count
