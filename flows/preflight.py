"""A pipeline's inputs, checked before Prefect or MLflow start: a bad value is a `UserError` in a
second or two, before any server, MLflow run or file.

The config's own values were checked when it was built (`flows.config`). Here, cheapest first: the
model's shape (config.json, the catalog, or a GGUF header), which the rank must fit (every adapted
matrix's min(d_in, d_out)) and `train.max_length` (the model's context); then the tokenizer (a
GGUF base is converted here, once, and cached for the runs) and the dataset, read, format-checked
and tokenized into the token cache (planner/token_cache.py), every prompt checked against
max_length. The pipeline's first task runs the same checks, so a scheduled run is checked too.
"""

from __future__ import annotations

from planner.lora import count_run_lora
from planner.shapes import check_context, load_shape


def check_inputs(config, ranks: tuple[int, ...] | None = None) -> dict:
    """Check `config`'s (a PipelineConfig) model, rank(s) and data.

    Args:
        config: the pipeline config.
        ranks: LoRA ranks to check (a sweep's); default the config's own.

    Returns:
        {"fingerprint", "examples", "format", "held_out_examples"} of the rows the runs will read
        (held-out examples before dropping those whose completion max_length cuts away).

    Raises:
        UserError: unknown model, a rank or max_length the model cannot take, unreadable or empty data.
    """
    lora = config.train_config("lora")
    shape = load_shape(config.model)
    for rank in ranks or (config.rank,):
        count_run_lora(shape, rank, lora.targets, lora.expert_rank_divisor, lora.target_unembedding)
    check_context(lora.max_length, shape.context_length, config.model, option="train.max_length")
    from trainer.data import check_data  # torch: only once everything cheap has passed
    from trainer.model import load_base_tokenizer

    # The data is read, format-checked and tokenized once, into the token cache the plan and both
    # trainings then read (docs/DATA.md); every prompt the runs use is checked against max_length.
    split = check_data(lora, load_base_tokenizer(config.model))
    return {"fingerprint": split.data.fingerprint, "examples": split.data.rows, "format": split.data.format,
            "held_out_examples": len(split.scored_idx)}
