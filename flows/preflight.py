"""A pipeline's inputs, checked before Prefect or MLflow start: a bad value is a `UserError` before
any server, MLflow run or file. The config's own values were checked when it was built
(`flows.config`); the pipeline's first task runs the same check, so a scheduled run is checked too.
"""

from __future__ import annotations


def check_rl_inputs(config) -> dict:
    """Check an RLPipelineConfig's reward, prompts and tokenizer: the reward spec loads (a `python:`
    reward's module imports), every row has a prompt and an answer, no prompt is longer than
    max_prompt_tokens.

    Returns:
        {"fingerprint", "train_prompts", "eval_prompts"} of the prompts both runs will read.

    Raises:
        UserError: a reward that cannot be loaded, missing or bad data, a model without a tokenizer.
    """
    from trainer.model import load_base_tokenizer
    from trainer.rewards import load_reward
    from trainer.rl import prepare_prompts

    lora = config.train_config("lora")
    load_reward(lora.reward)
    data = prepare_prompts(lora, load_base_tokenizer(config.model))
    return {"fingerprint": data.fingerprint, "train_prompts": len(data.train), "eval_prompts": len(data.eval)}
