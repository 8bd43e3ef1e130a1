"""The chunked completion-token loss equals the plain logits path, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from trainer.loss import IGNORE_INDEX, completion_nll_sum


def _reference(hidden, weight, labels):
    logits = (hidden @ weight.T).float()[:, :-1]
    targets = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def _inputs(seed=0, B=3, T=11, H=16, V=37, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_tokens", [1, 5, 4096])
@pytest.mark.parametrize("weight_trainable", [True, False])
def test_matches_plain_cross_entropy(chunk_tokens, weight_trainable):
    hidden, weight, labels = _inputs()
    weight.requires_grad_(weight_trainable)
    ours, count = completion_nll_sum(hidden, weight, labels, chunk_tokens=chunk_tokens)
    ours.backward()
    grads_ours = (hidden.grad.clone(), weight.grad.clone() if weight_trainable else None)
    hidden.grad = None
    weight.grad = None
    ref = _reference(hidden, weight, labels)
    ref.backward()
    assert count.item() == (labels[:, 1:] != IGNORE_INDEX).sum().item()
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads_ours[0], hidden.grad, rtol=1e-5, atol=1e-6)
    if weight_trainable:
        torch.testing.assert_close(grads_ours[1], weight.grad, rtol=1e-5, atol=1e-6)
    else:
        assert weight.grad is None


def test_upstream_gradient_scales_both_grads():
    hidden, weight, labels = _inputs(seed=1)
    nll, count = completion_nll_sum(hidden, weight, labels, chunk_tokens=4)
    (nll / count * 3.0).backward()
    h_grad = hidden.grad.clone()
    hidden.grad = None
    weight.grad = None
    ref = _reference(hidden, weight, labels)
    (ref / count * 3.0).backward()
    torch.testing.assert_close(h_grad, hidden.grad, rtol=1e-5, atol=1e-7)


def test_batch_without_completion_tokens_backpropagates_zero():
    hidden, weight, labels = _inputs(seed=2)
    labels[:] = IGNORE_INDEX
    nll, count = completion_nll_sum(hidden, weight, labels)
    nll.backward()
    assert count.item() == 0 and nll.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0


def test_bad_chunk_size_is_rejected():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens"):
        completion_nll_sum(hidden, weight, labels, chunk_tokens=0)
