"""A pipeline's inputs, checked before Prefect or MLflow start: a bad value is a `UserError` in a
second or two, before any server, MLflow run or file.

The config's own values were checked when it was built (`flows.config`). Here, cheapest first: the
model's shape (config.json, the catalog, or a GGUF header), which the rank must fit (every adapted
matrix's min(d_in, d_out)) and `train.max_length` (the model's context); then the tokenizer (a
GGUF base is converted here, once, and cached for the runs) and the dataset, read, format-checked
and tokenized into the token cache (data/token_cache.py), every prompt checked against
max_length. The pipeline's first task runs the same checks, so a scheduled run is checked too.
`check_inputs` serves the supervised pipeline, `check_rl_inputs` the RL one (its prompts are read
and checked against max_prompt_tokens instead).
"""

from __future__ import annotations

from planner.lora import count_run_lora
from planner.shapes import check_context, load_shape


def _check_model(config, run, ranks: tuple[int, ...] | None = None):
    """The model's shape, after checking every rank in `ranks` (default the config's) fits it."""
    shape = load_shape(config.model)
    for rank in ranks or (config.rank,):
        count_run_lora(shape, rank, run.targets, run.expert_rank_divisor, run.target_unembedding)
    return shape


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
    shape = _check_model(config, lora, ranks)
    check_context(lora.max_length, shape.context_length, config.model, option="train.max_length")
    from data.sources import load_tokenizer  # transformers: only once everything cheap has passed
    from trainer.data import check_data  # torch: only once everything cheap has passed

    # The data is read, format-checked and tokenized once, into the token cache the plan and both
    # trainings then read (docs/DATA.md); every prompt the runs use is checked against max_length.
    split = check_data(lora, load_tokenizer(config.model))
    return {"fingerprint": split.data.fingerprint, "examples": split.data.rows, "format": split.data.format,
            "held_out_examples": len(split.scored_idx)}


def check_rl_inputs(config) -> dict:
    """Check an RLPipelineConfig's model and rank, its reward (a `python:` reward's module imports)
    and its prompts (every row has a prompt and an answer, none longer than max_prompt_tokens).

    Returns:
        {"fingerprint", "train_prompts", "eval_prompts"} of the prompts both runs will read.

    Raises:
        UserError: unknown model, a rank it cannot take, a reward that cannot be loaded, missing or
            bad data.
    """
    from trainer.rewards import load_reward

    lora = config.train_config("lora")
    _check_model(config, lora)
    load_reward(lora.reward)
    from data.render import Renderer
    from data.sources import load_tokenizer  # transformers: only once everything cheap has passed
    from trainer.rl import prepare_prompts

    data = prepare_prompts(lora, Renderer(load_tokenizer(config.model)))
    return {"fingerprint": data.fingerprint, "train_prompts": len(data.train), "eval_prompts": len(data.eval)}
