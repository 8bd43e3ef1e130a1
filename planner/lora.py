"""LoRA adapter parameter counts: r·(d_in + d_out) per targeted d_out × d_in matrix (Hu et al. 2021).

MoE experts get their own rank, `max(1, r // divisor)`: the blog ("LoRA Without Regret",
Thinking Machines 2025) divides by the experts active per token so the LoRA/FullFT parameter ratio
matches a dense layer; peft's docs divide by the total number of experts. A fused 3-D expert
parameter (E, a, b) adapted through peft's `target_parameters` gets r·E·(a + b) parameters
(peft/tuners/lora/layer.py, `ParamWrapper.update_layer`): the same as E separate matrices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from data.errors import UserError
from planner.shapes import Matrix, ModelShape

TARGET_PRESETS = ("all", "attention", "mlp", "all-linear")
EXPERT_RANK_DIVISORS = ("active", "total", "none")
# Which roles each preset adapts. The router and the embedding are never adapted by our presets:
# the blog adapts neither; the unembedding only on request. `all-linear` is what peft's own
# `target_modules="all-linear"` builds (see `_PEFT_CONVERTED_MOE`), reported for comparison.
_PRESET_ROLES: dict[str, frozenset[str]] = {
    "all": frozenset({"attention", "mlp", "routed_expert", "shared_expert"}),
    "attention": frozenset({"attention"}),
    "mlp": frozenset({"mlp", "routed_expert", "shared_expert"}),
    "all-linear": frozenset({"attention", "mlp", "routed_expert", "shared_expert", "router"}),
}
_NEVER_ROLES = frozenset({"router", "embedding"})
_EXPERT_ROLES = frozenset({"routed_expert"})
# With transformers 5, peft converts the LoRA targets of these MoE families from transformers 4
# names to the fused expert parameters (peft 0.21 `utils/transformers_weight_conversion.py`,
# `_convert_peft_config_moe`; the families are transformers 5.23 `conversion_mapping.py`'s
# `_MODEL_TO_CONVERSION_PATTERN` entries for "qwen2_moe", plus peft's "mixtral"): a target named
# gate_proj, up_proj or down_proj becomes `experts.gate_up_proj` / `experts.down_proj`, so a dense
# MLP or shared expert with those names gets no adapter (DeepSeek-V3's first 3 layers and shared
# experts). With `target_modules="all-linear"` peft also adapts the router (`gate.weight`), gives
# every expert the full rank r and `experts.gate_up_proj` rank 2r (gate and up fused).
_PEFT_CONVERTED_MOE = frozenset({
    "qwen2_moe", "qwen3_moe", "qwen3_next", "deepseek_v2", "deepseek_v3", "deepseek_v32", "olmoe", "flex_olmo",
    "glm4_moe", "glm4_moe_lite", "dots1", "ernie4_5_moe", "hunyuan_v1_moe", "exaone_moe", "mixtral", "minimax",
})
_PEFT_REMAPPED_NAMES = frozenset({"gate_proj", "up_proj", "down_proj"})


@dataclass(frozen=True)
class MatrixLora:
    """The adapter on one matrix kind: `params = rank · (d_in + d_out) · count`."""

    name: str
    role: str
    d_in: int
    d_out: int
    count: int
    rank: int
    params: int


@dataclass(frozen=True)
class LoraCount:
    """Adapter parameters for a rank and target set.

    Attributes:
        rank: the rank of every non-expert adapter.
        unadapted: matrices a preset asks for that peft does not adapt in this family (dense MLPs
            and shared experts named gate_proj/up_proj/down_proj in `_PEFT_CONVERTED_MOE`).
        expert_rank: the rank of each routed expert's adapter (equals `rank` for dense models).
        expert_rank_divisor: `active`, `total` or `none`, and `divisor_value` the number used.
        targets: the matrix names adapted (peft's `target_modules` / `target_parameters` suffixes).
        matrices: per matrix kind, the rank, copies and parameters.
        total: all adapter parameters.
        by_role: total per role.
        per_layer: adapter parameters of one layer of each kind (`dense`, `moe`).
    """

    rank: int
    expert_rank: int
    expert_rank_divisor: str
    divisor_value: int
    targets: tuple[str, ...]
    matrices: tuple[MatrixLora, ...]
    total: int
    by_role: dict[str, int]
    per_layer: dict[str, int]
    unadapted: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "rank": self.rank, "expert_rank": self.expert_rank, "unadapted": list(self.unadapted),
            "expert_rank_divisor": self.expert_rank_divisor, "divisor_value": self.divisor_value,
            "targets": list(self.targets), "total": self.total, "by_role": dict(self.by_role),
            "per_layer": dict(self.per_layer),
            "matrices": [vars(m) for m in self.matrices],
        }


def expert_divisor(shape: ModelShape, divisor: str) -> int:
    """The number the expert rank is divided by: experts per token, all experts, or 1."""
    if divisor not in EXPERT_RANK_DIVISORS:
        raise UserError(f"Unknown expert rank divisor {divisor!r}: use one of {', '.join(EXPERT_RANK_DIVISORS)}.")
    if not shape.is_moe or divisor == "none":
        return 1
    return shape.experts_per_token if divisor == "active" else shape.num_experts


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _layers_holding(shape: ModelShape, m: Matrix) -> int:
    """How many layers hold a copy of `m` (1 for matrices outside the layer stack)."""
    if m.layer_kind is None:
        return 1
    return shape.num_layers if m.layer_kind == "all" else shape.layers_by_kind[m.layer_kind]


def select_targets(
    shape: ModelShape, targets: str | list[str] | tuple[str, ...] = "all", target_unembedding: bool = False
) -> tuple[Matrix, ...]:
    """The matrices a target preset or a list of matrix names adapts.

    A name matches a matrix's full name (`experts.down_proj`) or its last part (`down_proj`, which
    also matches `shared_experts.down_proj` and the experts' `down_proj`). `lm_head` may be named.

    Raises:
        UserError: unknown preset or name, or a router/embedding named.
    """
    if isinstance(targets, str) and targets in _PRESET_ROLES:
        roles = _PRESET_ROLES[targets]
        if targets == "all-linear" and shape.model_type not in _PEFT_CONVERTED_MOE:
            roles = roles - {"routed_expert", "router"}  # 3-D experts and routers are not nn.Linear
        chosen = [m for m in shape.matrices if m.role in roles]
    else:
        names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
        if not names:
            raise UserError("No target matrices given: use all, attention, mlp or a list like q_proj,v_proj.")
        chosen = []
        for wanted in names:
            hits = [m for m in shape.matrices if wanted in (m.name, _short(m.name))]
            if not hits:
                available = sorted({m.name for m in shape.matrices if m.role not in _NEVER_ROLES})
                raise UserError(
                    f"No matrix named {wanted!r} in {shape.name}: use a preset "
                    f"({', '.join(TARGET_PRESETS)}) or names from {', '.join(available)}."
                )
            never = [m.name for m in hits if m.role in _NEVER_ROLES]
            if never:
                raise UserError(f"{', '.join(never)} (router or embedding) is never adapted: drop it from the targets.")
            chosen += [m for m in hits if m not in chosen]
    if target_unembedding:
        chosen += [m for m in shape.matrices if m.role == "unembedding" and m not in chosen]
    return tuple(m for m in chosen if not _peft_remaps(shape, m))


def peft_retargets(model_type: str, linear_name: str) -> bool:
    """True for an MLP or shared-expert linear (by name) that peft re-targets to the fused experts in
    this model family, so that it gets no adapter of its own (see `_PEFT_CONVERTED_MOE`)."""
    return model_type in _PEFT_CONVERTED_MOE and _short(linear_name) in _PEFT_REMAPPED_NAMES


def _peft_remaps(shape: ModelShape, m: Matrix) -> bool:
    return m.role in ("mlp", "shared_expert") and peft_retargets(shape.model_type, m.name)


def count_lora_params(
    shape: ModelShape,
    rank: int,
    targets: str | list[str] | tuple[str, ...] = "all",
    expert_rank_divisor: str = "active",
    target_unembedding: bool = False,
) -> LoraCount:
    """LoRA parameters of each targeted matrix, per layer and in total.

    Raises:
        UserError: rank < 1, unknown targets or divisor.
    """
    if int(rank) != rank or rank < 1:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r}.")
    peft_all_linear = targets == "all-linear"
    divisor = 1 if peft_all_linear else expert_divisor(shape, expert_rank_divisor)
    expert_rank = max(1, rank // divisor)
    chosen = select_targets(shape, targets, target_unembedding)
    per_matrix = []
    for m in chosen:
        r = expert_rank if m.role in _EXPERT_ROLES else rank
        if peft_all_linear and m.name == "experts.gate_up_proj":  # peft fuses gate and up: rank 2r
            r *= 2
        per_matrix.append(MatrixLora(m.name, m.role, m.d_in, m.d_out, m.count, r, r * (m.d_in + m.d_out) * m.count))
    asked = _PRESET_ROLES.get(targets, ()) if isinstance(targets, str) else ()
    unadapted = tuple(m.name for m in shape.matrices if m.role in asked and _peft_remaps(shape, m))
    by_role: dict[str, int] = {}
    for ml in per_matrix:
        by_role[ml.role] = by_role.get(ml.role, 0) + ml.params
    per_layer = {
        kind: sum(ml.params // _layers_holding(shape, m) for ml, m in zip(per_matrix, chosen, strict=True)
                  if m.layer_kind in ("all", kind))
        for kind in shape.layers_by_kind
    }
    return LoraCount(
        rank=rank, expert_rank=expert_rank if shape.is_moe else rank,
        expert_rank_divisor=expert_rank_divisor, divisor_value=divisor,
        targets=tuple(m.name for m in chosen), matrices=tuple(per_matrix),
        total=sum(ml.params for ml in per_matrix), by_role=by_role, per_layer=per_layer, unadapted=unadapted,
    )


def check_rank_fits(matrices: Iterable[tuple[str, int, int, int]]) -> None:
    """Refuse a rank above min(d_in, d_out) of an adapted matrix: B·A then has more parameters than a
    full-rank update needs and cannot express more, so it is almost surely a mistake. The planner and
    the trainer (on the loaded model's modules) both check with this.

    Args:
        matrices: (name, d_in, d_out, rank) of every adapted matrix.

    Raises:
        UserError: naming the first matrix the rank does not fit and the largest rank that does.
    """
    for name, d_in, d_out, rank in matrices:
        if rank > min(d_in, d_out):
            raise UserError(
                f"rank {rank} is larger than min(d_in, d_out) = {min(d_in, d_out)} of {name} "
                f"({d_out}x{d_in}): an update of that matrix has rank at most {min(d_in, d_out)}. "
                f"Choose rank <= {min(d_in, d_out)} or leave that layer out of targets."
            )


def count_run_lora(
    shape: ModelShape,
    rank: int,
    targets: str | list[str] | tuple[str, ...] = "all",
    expert_rank_divisor: str = "active",
    target_unembedding: bool = False,
) -> LoraCount:
    """`count_lora_params` for the rank a run will train, which every adapted matrix must take
    (`check_rank_fits`); the capacity search counts higher ranks with `count_lora_params` itself."""
    count = count_lora_params(shape, rank, targets, expert_rank_divisor, target_unembedding)
    check_rank_fits((m.name, m.d_in, m.d_out, m.rank) for m in count.matrices)
    return count


def peft_target_kwargs(count: LoraCount) -> dict:
    """`LoraConfig` keyword arguments that adapt exactly the matrices `count` counts.

    Linear modules go to `target_modules`; fused 3-D expert parameters to `target_parameters`
    (peft >= 0.17), with `rank_pattern` giving them the expert rank when it differs. peft 0.21
    warns that such rank_pattern keys "did not match any targeted module" yet applies them
    (tests/planner/test_lora.py checks the count).
    """
    modules = sorted({m.name for m in count.matrices if m.role not in _EXPERT_ROLES})
    parameters = sorted({m.name for m in count.matrices if m.role in _EXPERT_ROLES})
    kwargs: dict = {"r": count.rank, "target_modules": modules or None}
    if parameters:
        kwargs["target_parameters"] = parameters
        if count.expert_rank != count.rank:
            kwargs["rank_pattern"] = {name: count.expert_rank for name in parameters}
    return kwargs
