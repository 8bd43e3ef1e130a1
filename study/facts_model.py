"""The capacity experiment's model: a small Llama whose knee is reachable on a CPU in minutes.

Why this model (docs/STUDY.md, "Capacity"): the knee is where an adapter's parameters stop holding
the data, so the data must be large in bits against the adapter at small ranks, and every run must
train to convergence. SmolLM2-135M's rank-1 adapter has 0.3M parameters (~0.6M bits at the 2
bits/param prior): its knee needs ~100k facts, hours of CPU per run. A real architecture (Llama:
RoPE, GQA, SwiGLU, RMSNorm) cut to hidden 64 and 2 layers has ~2k adapter parameters per unit of
rank, so a few hundred facts (5 bits each at 32 choices) put the 2-bits/param prior's knee near
rank 1 and leave room above it for a knee that is further out, and a run takes seconds to minutes.

A random-init base would spend its LoRA capacity on the answer template too. So the base is first
taught the format by our own trainer (FullFT, one pass over 20,000 facts about *other* invented
names, too few exposures to memorise them): afterwards it copies the template from the question and
spreads its probability over the attribute's values, so its loss on a new fact is ≈ log2(choices)
bits, and what a run absorbs on top of it is the facts themselves. Then it memorises a few hundred
other facts over many passes (`study.design.memorise_part`): a model that never had to store a fact
gives LoRA no machinery to store one with (pilots: ~0.02 bits/param at any rank without it).

The tokenizer is a byte-level BPE learnt here from facts text (1,024 tokens): the template words
and every value are single tokens, invented names 2-4 tokens, any other text still encodes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Facts about names drawn with this seed teach the tokenizer; never a seed a study dataset uses.
TOKENIZER_CORPUS = "builtin:facts?n_facts=20000&choices=32&seed=12345"
SPEC_FILE = "study_model.json"


@dataclass(frozen=True)
class ModelSpec:
    """A Llama config small enough for the CPU (hidden_size etc. as in transformers' LlamaConfig)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 1024
    max_position_embeddings: int = 128
    init_seed: int = 0

    def config(self) -> dict:
        """The config.json fields the planner reads (`planner.shapes.load_shape` takes this dict)."""
        return {"model_type": "llama", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads, "intermediate_size": self.intermediate_size,
                "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": True}


def build_tokenizer(vocab_size: int):
    """The study's byte-level BPE tokenizer with a ChatML template (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data.dataset import load_rows

    texts = []
    for row in load_rows(TOKENIZER_CORPUS):
        question, answer = (m["content"] for m in row["messages"])
        texts += [f"user {question}", f"assistant {answer}"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_base_model(out_dir: str | Path, spec: ModelSpec = ModelSpec()) -> str:
    """Save the randomly initialised model of `spec` and its tokenizer at `out_dir` (a model folder
    any model reference accepts); a folder already holding this spec is reused. Returns its path."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = Path(out_dir)
    if (out / SPEC_FILE).is_file() and json.loads((out / SPEC_FILE).read_text()) == asdict(spec):
        return str(out)
    tokenizer = build_tokenizer(spec.vocab_size)
    fields = {k: v for k, v in spec.config().items() if k != "model_type"} | {"vocab_size": len(tokenizer)}
    config = LlamaConfig(**fields, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    torch.manual_seed(spec.init_seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))
    return str(out)
