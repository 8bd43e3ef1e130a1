"""The one completion NLL: the chunked path equals the full-logits path (losses, per-example sums
and gradients to 1e-5 on CPU) in every trainer mode that uses it, and falls back where it cannot."""

import pytest
import torch

from data.dataset import IGNORE_INDEX
from tests.tiny import build_tokenizer, tiny_config
from trainer.data import Sequence, collate, pack
from trainer.loss import completion_nll, loss_head, next_token_targets, train_micro_batch

X = IGNORE_INDEX
# Two examples with prompts (X) and completions of different lengths, and one with no loss.
A = Sequence([5, 9, 13, 17, 21, 25], [X, X, 17, 21, 25, X], list(range(6)))
B = Sequence([30, 31, 32], [31, 32, X], list(range(3)))
C = Sequence([40, 41, 42, 43], [X, X, X, X], list(range(4)))


def _model(arch, method="full", checkpointing=False, target_unembedding=False):
    from transformers import AutoModelForCausalLM

    from trainer.model import apply_lora, resolve_targets

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(build_tokenizer())))
    if method == "lora":
        model = apply_lora(model, 4, 32, resolve_targets(model, 4, "all", target_unembedding=target_unembedding))
        with torch.no_grad():  # B = 0 at init would leave A without gradient: make both matter
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _run(model, batch, head, scale=0.25):
    model.zero_grad(set_to_none=True)
    nll = train_micro_batch(model, batch, scale, head=head)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return nll, grads


@pytest.mark.parametrize(
    "arch, method, checkpointing, packed, chunk",
    [
        ("llama", "full", False, False, None),  # tied embeddings: the head's weight is the embedding
        ("qwen3", "full", False, False, 3),  # untied head, several chunks
        ("qwen3_moe", "lora", False, False, None),  # MoE experts through target_parameters
        ("mixtral", "full", False, False, 1),
        ("llama", "lora", True, False, None),  # gradient checkpointing
        ("qwen3", "lora", False, True, 2),  # packed rows
    ],
)
def test_chunked_loss_equals_full_logits(arch, method, checkpointing, packed, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr("trainer.loss.CHUNK_TOKENS", chunk)
    model = _model(arch, method, checkpointing)
    rows = pack([A, B, C], max_length=16, seed=0) + [B] if packed else [A, B, C]
    batch = collate(rows, pad_id=0, packed=packed)
    head, why = loss_head(model)
    assert head is not None, why
    chunked, chunked_grads = _run(model, batch, head)
    full, full_grads = _run(model, batch, None)

    torch.testing.assert_close(chunked.nll_sum, full.nll_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.example_nll_B, full.example_nll_B, rtol=1e-5, atol=1e-5)
    assert chunked.example_tokens_B.tolist() == full.example_tokens_B.tolist()
    assert chunked.example_tokens_B.sum().item() == sum(s.loss_tokens for s in rows)
    assert chunked_grads.keys() == full_grads.keys() and chunked_grads
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in chunked_grads.values())


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_chunk_size_changes_nothing_without_grad(chunk):
    model = _model("qwen3").eval()
    batch = collate([A, B, C], pad_id=0, packed=False)
    head, _ = loss_head(model)
    with torch.no_grad():
        got = completion_nll(model, batch, head=head, chunk_tokens=chunk)
        want = completion_nll(model, batch, head=None)
    torch.testing.assert_close(got.example_nll_B, want.example_nll_B, rtol=1e-5, atol=1e-5)
    assert got.example_nll_B[2].item() == 0.0 and got.example_tokens_B.tolist() == [3, 2, 0]


def test_bf16_autocast_uses_the_dtype_the_head_would_have_used():
    model = _model("llama")
    batch = collate([A, B], pad_id=0, packed=False)
    head, _ = loss_head(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, chunked_grads = _run(model, batch, head)
        full, full_grads = _run(model, batch, None)
    # Both run the unembedding matmul in bf16: agreement to bf16 precision (~3 significant digits).
    torch.testing.assert_close(chunked.nll_sum, full.nll_sum, rtol=2e-2, atol=0)
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], rtol=5e-2, atol=5e-3, msg=name)


def test_batch_without_completion_tokens_backpropagates_zero():
    model = _model("llama")
    head, _ = loss_head(model)
    nll, grads = _run(model, collate([C], pad_id=0, packed=False), head)
    assert nll.nll_sum.item() == 0.0 and nll.example_tokens_B.tolist() == [0]
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_modes_the_chunked_loss_cannot_serve_fall_back_with_a_reason():
    from transformers import AutoModelForCausalLM, Gemma2Config

    head, why = loss_head(_model("qwen3", "lora", target_unembedding=True))
    assert head is None and "LoRA" in why
    head, why = loss_head(_model("llama"), sharded=True)
    assert head is None and "FSDP" in why
    gemma2 = AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8))  # soft-caps its logits after the head
    head, why = loss_head(gemma2)
    assert head is None and "gemma2" in why


def test_step_runs_under_fake_tensor_mode():
    """The memory harness (benchmarks/memory_model.py) measures this very step on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from transformers import AutoModelForCausalLM

    batch = collate([A, B], pad_id=0, packed=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AutoModelForCausalLM.from_config(tiny_config("llama", len(build_tokenizer())))
        head, _ = loss_head(model)
        nll = train_micro_batch(model, batch, 0.5, head=head)
    assert isinstance(nll.nll_sum, FakeTensor)
    assert model.lm_head.weight.grad.shape == model.lm_head.weight.shape


def test_next_token_targets_shift_by_one():
    labels = torch.tensor([[X, 7, 8, 9]])
    assert next_token_targets(labels).tolist() == [[7, 8, 9, X]]
