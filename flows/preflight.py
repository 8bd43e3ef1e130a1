"""A pipeline's inputs, checked before Prefect or MLflow start: a bad value is a `UserError` in a
second or two, before any server, MLflow run or file.

The config's own values were checked when it was built (`flows.config`). Here, cheapest first: the
model's shape (config.json, the catalog, or a GGUF header), which the rank must fit (every adapted
matrix's min(d_in, d_out)) and `train.max_length` (the model's context); then the dataset, read
and format-checked; last the tokenizer (a GGUF base is converted here, once, and cached for the
runs). The pipeline's first task runs the same checks, so a scheduled run is checked too.
"""

from __future__ import annotations

from planner.dataset import dataset_fingerprint, detect_format, load_rows, split_rows
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
    rows = load_rows(config.dataset, limit=lora.dataset_limit)
    data_format = detect_format(rows, source=config.dataset)
    if lora.eval_dataset is not None:
        eval_rows = load_rows(lora.eval_dataset)
        detect_format(eval_rows, source=lora.eval_dataset)
        held_out = len(eval_rows)
    else:
        held_out = len(split_rows(rows, lora.eval_fraction, lora.held_out_seed)[1])
    if lora.eval_max_examples is not None:
        held_out = min(held_out, lora.eval_max_examples)
    from trainer.model import load_base_tokenizer  # torch: only once everything cheap has passed

    load_base_tokenizer(config.model)
    return {"fingerprint": dataset_fingerprint(rows), "examples": len(rows), "format": data_format,
            "held_out_examples": held_out}
