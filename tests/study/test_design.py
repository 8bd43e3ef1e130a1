"""study.design: the knee is reachable with the chosen model and sizes, layer cells match in parameters."""

import pytest

from data.builtin_datasets import facts_information_bits
from planner.capacity import LOW_REGRET_RATIO, PRIOR_BITS_PER_PARAM
from planner.catalog import find_entry
from planner.lora import count_lora_params
from planner.shapes import load_shape
from study import design
from study.design import FULL, QUICK, edge_extension_lr


def _params(config, rank, targets="all"):
    return count_lora_params(load_shape(config), rank, targets).total


@pytest.mark.parametrize("scale", [FULL, QUICK], ids=["full", "quick"])
def test_the_knee_grid_can_test_the_prior_and_fullft_is_never_short_of_capacity(scale):
    config = scale.model_spec.config()
    shape = load_shape(config)
    for n in scale.knee_sizes:
        info = facts_information_bits(n, scale.facts_choices)
        # The planner's prediction under the prior lies inside the rank grid, so it can be compared.
        needed = LOW_REGRET_RATIO * info / PRIOR_BITS_PER_PARAM
        predicted = next(r for r in (1, 2, 4, 8, 16, 32, 64) if _params(config, r) >= needed)
        assert min(scale.knee_ranks) <= predicted <= max(scale.knee_ranks)
        # FullFT, the reference every rank is measured against, has >= 10x the data's bits at the prior.
        assert shape.total_params * PRIOR_BITS_PER_PARAM >= 10 * info
    # The grid spans a factor 32 in adapter parameters (16 in the quick one) to find a knee in.
    assert max(scale.knee_ranks) / min(scale.knee_ranks) >= (32 if scale is FULL else 4)


def test_facts_model_has_the_documented_adapter_counts():
    config = FULL.model_spec.config()
    assert (_params(config, 1, "attention"), _params(config, 1, "mlp"), _params(config, 1)) == (896, 1152, 2048)


@pytest.mark.parametrize("scale", [FULL, QUICK], ids=["full", "quick"])
def test_layer_cells_match_in_parameter_count(scale):
    smol = find_entry("HuggingFaceTB/SmolLM2-135M").config
    for cells, config in ((scale.facts_layer_cells, scale.model_spec.config()),
                          (scale.lr_layer_cells, smol if scale.lr_model else scale.model_spec.config())):
        counts = [_params(config, rank, targets) for targets, rank in cells]
        assert max(counts) / min(counts) < 1.25 if scale is QUICK else 1.03, (cells, counts)


def test_smollm2_counts_quoted_in_the_design():
    smol = find_entry("HuggingFaceTB/SmolLM2-135M").config
    assert [_params(smol, 1, t) for t in ("attention", "mlp", "all")] == [115_200, 190_080, 305_280]
    assert [_params(smol, r, t) for t, r in FULL.lr_layer_cells] == [4_884_480, 4_838_400, 4_942_080]


def test_parts_share_run_folders_where_cells_coincide():
    base = "/m"
    lrs = design.ChosenLrs(facts_lora=1e-2, facts_full=3e-3, lr_lora=1e-3, lr_full=1e-4)
    knee = design.knee_parts(FULL, base, lrs.facts_lora, lrs.facts_full)
    facts_lr = design.facts_lr_part(FULL, base)
    # The facts LRs are swept at the middle size: the smallest size's LR failed on the longer runs.
    assert facts_lr.tags["n_facts"] == FULL.mid_knee_size == 1024
    mid = next(p for p in knee if p.tags["n_facts"] == facts_lr.tags["n_facts"])
    assert mid.name == facts_lr.name and mid.sweep["base"] == facts_lr.sweep["base"]
    # Every memorisation run is scored on all of its own training facts.
    for part in knee:
        assert part.sweep["base"]["train"]["eval_dataset"] == part.sweep["base"]["dataset"]
        assert part.sweep["base"]["train"]["eval_max_examples"] is None
    (noise,) = design.noise_parts(FULL, base, lrs.lr_lora, lrs.lr_full)
    assert noise.sweep["base"]["seeds"] == list(FULL.noise_seeds)  # replicates in one sweep, one held-out split
    lr_part = design.lr_parts(FULL, base)[0]
    assert noise.name == lr_part.name  # seed 0 is the LR sweep's own cell (same folder, same run key)
    assert {k: v for k, v in noise.sweep["base"].items() if k != "seeds"} == lr_part.sweep["base"]


@pytest.mark.parametrize("lrs, best, extension", [
    ([1e-3, 3e-3, 1e-2], 1e-3, 1e-3 / 3), ([1e-3, 3e-3, 1e-2], 1e-2, 3e-2), ([1e-3, 3e-3, 1e-2], 3e-3, None),
    ([1e-2, 1e-1], 1e-1, None)])  # 1.0 is no learning rate
def test_edge_extension_is_one_grid_step_out(lrs, best, extension):
    got = edge_extension_lr(lrs, best)
    assert got == pytest.approx(extension) if extension else got is None
