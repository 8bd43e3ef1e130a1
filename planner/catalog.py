"""Published model configs, so `lowregret plan --model meta-llama/Llama-3.1-8B` works offline.

Each entry copies the shape keys of the model's config.json on the Hugging Face Hub (the URL is
given per entry); `planner.shapes.shape_from_config` reads them exactly as it reads a file.
Names match case-insensitively, with or without the Hub org prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CatalogEntry:
    """A model's Hub id, other names with the same shape, and its config.json shape keys."""

    hub_id: str
    config: dict
    aliases: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.hub_id.split("/", 1)[1]


_LLAMA3_VOCAB = 128256

CATALOG: tuple[CatalogEntry, ...] = (
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
    CatalogEntry("meta-llama/Llama-3.2-1B", {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": _LLAMA3_VOCAB,
        "tie_word_embeddings": True}, ("meta-llama/Llama-3.2-1B-Instruct",)),
    # https://huggingface.co/meta-llama/Llama-3.2-3B/blob/main/config.json
    CatalogEntry("meta-llama/Llama-3.2-3B", {
        "model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
        "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": _LLAMA3_VOCAB,
        "tie_word_embeddings": True}, ("meta-llama/Llama-3.2-3B-Instruct",)),
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    CatalogEntry("meta-llama/Llama-3.1-8B", {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": _LLAMA3_VOCAB,
        "tie_word_embeddings": False},
        ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3-8B")),
    # https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json
    CatalogEntry("meta-llama/Llama-3.1-70B", {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": _LLAMA3_VOCAB,
        "tie_word_embeddings": False},
        ("meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.3-70B-Instruct")),
    # https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json
    CatalogEntry("Qwen/Qwen3-0.6B", {
        "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "tie_word_embeddings": True}),
    # https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json
    CatalogEntry("Qwen/Qwen3-8B", {
        "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "tie_word_embeddings": False}),
    # https://huggingface.co/Qwen/Qwen3-32B/blob/main/config.json
    CatalogEntry("Qwen/Qwen3-32B", {
        "model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "tie_word_embeddings": False}),
    # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json
    CatalogEntry("Qwen/Qwen3-30B-A3B", {
        "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
        "tie_word_embeddings": False}),
    # https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json
    CatalogEntry("Qwen/Qwen3-235B-A22B", {
        "model_type": "qwen3_moe", "hidden_size": 4096, "intermediate_size": 12288,
        "moe_intermediate_size": 1536, "num_hidden_layers": 94, "num_attention_heads": 64,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
        "tie_word_embeddings": False}),
    # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json
    CatalogEntry("mistralai/Mixtral-8x7B", {
        "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "vocab_size": 32000, "tie_word_embeddings": False},
        ("mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1")),
    # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json
    CatalogEntry("deepseek-ai/DeepSeek-V3", {
        "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
        "v_head_dim": 128, "vocab_size": 129280, "tie_word_embeddings": False},
        ("deepseek-ai/DeepSeek-V3-Base", "deepseek-ai/DeepSeek-R1")),
    # https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json
    CatalogEntry("HuggingFaceTB/SmolLM2-135M", {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "tie_word_embeddings": True}, ("HuggingFaceTB/SmolLM2-135M-Instruct",)),
)


def _keys(hub_id: str) -> tuple[str, str]:
    return hub_id.lower(), hub_id.split("/", 1)[1].lower()


_BY_NAME: dict[str, CatalogEntry] = {
    key: entry for entry in CATALOG for hub_id in (entry.hub_id, *entry.aliases) for key in _keys(hub_id)
}


def catalog_names() -> list[str]:
    """Short names of the catalog models (each also accepted with its org prefix)."""
    return [entry.name for entry in CATALOG]


def find_entry(name: str) -> CatalogEntry | None:
    """The catalog entry for a name, case-insensitive, with or without the org prefix."""
    return _BY_NAME.get(name.strip().lower())


def catalog_config(name: str) -> dict | None:
    """A copy of the catalog config for `name`, or None when it is not in the catalog."""
    entry = find_entry(name)
    return None if entry is None else dict(entry.config)
