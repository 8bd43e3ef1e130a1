"""Tiny real-architecture models and a small tokenizer, built offline for tests (DESIGN.md).

`tiny_model_dir(tmp_path, "llama")` writes a randomly initialised 2-layer model with hidden
size 64 plus a tokenizer trained here, in the same folder layout as a Hub checkpoint, so any
code path that takes a model reference can take it.
"""

from __future__ import annotations

import functools
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    """Real English text shipped with Python: standard-library docstrings."""
    import collections
    import json
    import os
    import pathlib

    texts = [m.__doc__ or "" for m in (collections, json, os, pathlib, functools)]
    texts += [f.__doc__ or "" for f in (os.path.join, json.dumps, sorted, zip, map, open)]
    texts.append("The capital of France is Paris. user assistant system question answer")
    return [t for t in texts if t]


@functools.lru_cache(maxsize=1)
def build_tokenizer():
    """A byte-level BPE tokenizer (~400 tokens) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int):
    """A 2-layer, hidden-64 config of a real architecture: llama, qwen3, qwen3_moe, mixtral."""
    from transformers import LlamaConfig, MixtralConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=None,
    )
    if arch == "llama":
        return LlamaConfig(intermediate_size=128, tie_word_embeddings=True, **common)
    if arch == "qwen3":
        return Qwen3Config(intermediate_size=128, head_dim=16, tie_word_embeddings=False, **common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            tie_word_embeddings=False,
            **common,
        )
    if arch == "mixtral":
        return MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **common)
    raise ValueError(f"unknown tiny arch {arch!r}")


def tiny_model_dir(root: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random model of `arch` plus the test tokenizer under root/arch; return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(root) / f"tiny-{arch}"
    if (out / "config.json").is_file():
        return out
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
