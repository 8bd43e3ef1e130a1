"""Policy-gradient RL with a verifiable reward, for LoRA and FullFT: setup → train → save.

Each step takes `prompts_per_step` prompts (the same prompts in the same order for every run with
one seed: `trainer.data.step_indices`), samples `group_size` completions of each from the current
policy (temperature 1, no top-k/top-p: the samples come from the policy itself), scores them with
the reward, and takes one AdamW step on the policy-gradient loss

    loss = −(1 / N) Σ_i A_i · log π(y_i | x_i),    A_i = r_i − mean(r of i's group)   [÷ std, optional]

where log π(y_i | x_i) sums the log-probabilities of completion i's tokens (up to and including its
end token) and N = prompts_per_step × group_size: `trainer.loss.completion_nll` with the advantages
as per-row weights, Σ_i A_i · NLL_i / N. This is REINFORCE with the group mean as the
baseline (GRPO's group-normalised advantage; Shao et al. 2024, DeepSeekMath). The update is
on-policy (one step per batch of samples), so PPO's importance ratio is 1 and its clipping never
acts; there is no KL penalty, as in LoRA Without Regret's RL experiments. Groups whose samples all
earn the same reward have zero advantage and are skipped: they carry no signal.

Sampling is seeded per step (`seed`, step), so a resumed run draws exactly the samples the
uninterrupted run drew. Held-out evaluation is greedy, at log-spaced steps: the mean reward and
the accuracy (share of prompts whose reward reaches `trainer.rewards.SOLVED_REWARD`), with each
prompt's reward kept for the paired comparison of LoRA with FullFT (evaluation/rl.py).

Single process (CPU or one GPU). The run's lifecycle is the supervised loop's (trainer/lifecycle.py:
preflight, the partial folder, the resume check, the optimizer, the eval and checkpoint cadence,
finalize): everything goes to `<output_dir>.partial/` and is renamed at the end.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import torch

from planner.dataset import IGNORE_INDEX
from planner.errors import UserError
from trainer import checkpoint as ckpt
from trainer import lifecycle as life
from trainer.data import Sequence, collate, load_split, step_indices
from trainer.loss import completion_nll, loss_head
from trainer.model import count_trainable, load_base_tokenizer, load_for_training, save_trained
from trainer.rewards import SOLVED_REWARD, load_reward
from trainer.rl_config import EVAL_REWARDS_FILE, RLConfig, RLResult

# ---------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text (what the reward sees), the expected answer, its tokens and its id."""

    text: str
    answer: str
    input_ids: tuple[int, ...]
    key: str
    """sha256 of the canonical row (16 hex): pairs held-out prompts across runs."""


@dataclass
class PromptData:
    train: list[Prompt]
    eval: list[Prompt]
    fingerprint: str
    stats: dict = field(default_factory=dict)


def _messages(row: dict, index: int, source: str) -> tuple[list[dict], str]:
    """The chat messages of a row's prompt and the text the reward sees (the last user turn)."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}], prompt
    if (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                    and m.get("role") in ("system", "user", "assistant")
                                                    for m in prompt)):
        return prompt, prompt[-1]["content"]
    raise UserError(
        f"{source}: row {index} has no usable 'prompt' (got {prompt!r:.80}). An RL row is "
        '{"prompt": "question text" (or a list of chat messages), "answer": "expected answer"}.'
    )


def _answer(row: dict, index: int, source: str) -> str:
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        raise UserError(
            f"{source}: row {index} has no usable 'answer' (got {answer!r:.80}). Each RL row needs an answer "
            "(a string or number) for the reward to compare the completion with."
        )
    return str(answer)


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt tokens: the chat template with the assistant turn opened, or the plain text without one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]


def prepare_prompts(config: RLConfig, tokenizer) -> PromptData:
    """Load, split and tokenize the prompts of `config`.

    Raises:
        UserError: no rows, a row without prompt or answer, a prompt longer than max_prompt_tokens.
    """
    from planner.dataset import dataset_fingerprint

    _, train_rows, eval_rows = load_split(config)

    def encode(row_list: list[dict], source: str) -> list[Prompt]:
        prompts = []
        for i, row in enumerate(row_list):
            if not isinstance(row, dict):
                raise UserError(f"{source}: row {i} is not an object with 'prompt' and 'answer'.")
            messages, text = _messages(row, i, source)
            answer = _answer(row, i, source)
            ids = encode_prompt(tokenizer, messages)
            if len(ids) > config.max_prompt_tokens:
                raise UserError(
                    f"{source}: row {i}'s prompt has {len(ids)} tokens > max_prompt_tokens={config.max_prompt_tokens}: "
                    "raise max_prompt_tokens or shorten the prompt."
                )
            key = hashlib.sha256(json.dumps([messages, answer], sort_keys=True).encode()).hexdigest()[:16]
            prompts.append(Prompt(text, answer, tuple(ids), key))
        return prompts

    train = encode(train_rows, config.dataset)
    evals = encode(eval_rows, config.eval_dataset or config.dataset)
    fingerprint = dataset_fingerprint(train_rows) + (
        "" if config.eval_dataset is None else "+" + dataset_fingerprint(eval_rows))
    stats = {"train_prompts": len(train), "eval_prompts": len(evals),
             "max_prompt_tokens_seen": max(len(p.input_ids) for p in train + evals)}
    return PromptData(train, evals, fingerprint, stats)


# ------------------------------------------------------------------------------------ sampling


@dataclass
class Rollouts:
    """Completions of prompts: each row's prompt tokens, completion tokens (up to and including its
    first end token) and completion text (special tokens dropped)."""

    prompts: list[tuple[int, ...]]
    completions: list[list[int]]
    texts: list[str]

    def batch(self, rows: list[int], pad_id: int):
        """The rows as a right-padded `trainer.data.Batch` whose targets are the completion tokens."""
        seqs = []
        for row in rows:
            prompt, completion = list(self.prompts[row]), self.completions[row]
            ids = prompt + completion
            targets = [IGNORE_INDEX] * (len(prompt) - 1) + completion + [IGNORE_INDEX]  # targets[t] = ids[t + 1]
            seqs.append(Sequence(ids, targets, list(range(len(ids)))))
        return collate(seqs, pad_id, packed=False)


def end_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def generate(model, prompts: list[tuple[int, ...]], *, max_new_tokens: int, pad_id: int, end_ids: list[int],
             greedy: bool, tokenizer) -> Rollouts:
    """Complete each prompt once (batched, left-padded): sampled at temperature 1, or greedy."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    # Sampling knobs set explicitly: unset ones are filled from the model's generation_config and
    # then transformers' defaults (top_k=50), which would sample from another distribution than the
    # policy's. top_k=0 turns top-k off.
    sampling = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=pad_id,
                                  eos_token_id=end_ids, **sampling)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             generation_config=generation)
    completions = []
    for row in out[:, width:].tolist():
        end = next((i for i, token in enumerate(row) if token in end_ids), None)
        completions.append(row if end is None else row[: end + 1])  # what follows the end token is padding
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    return Rollouts(list(prompts), completions, texts)


def group_advantages(rewards_P_G: torch.Tensor, scale: bool) -> torch.Tensor:
    """Reward minus its group's mean (GRPO's baseline); divided by the group's std when `scale`."""
    centred = rewards_P_G - rewards_P_G.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (rewards_P_G.std(dim=1, keepdim=True) + 1e-6)
    return centred


def _sampling_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % 2**63


# ---------------------------------------------------------------------------------- evaluation


def greedy_rewards(model, tokenizer, prompts: list[Prompt], reward_fn, *, max_new_tokens: int, batch_size: int,
                   end_ids: list[int]) -> tuple[list[float], list[str]]:
    """Each held-out prompt's reward for its greedy completion, and the completions."""
    model.eval()
    rewards, texts = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        out = generate(model, [p.input_ids for p in chunk], max_new_tokens=max_new_tokens,
                       pad_id=tokenizer.pad_token_id, end_ids=end_ids, greedy=True, tokenizer=tokenizer)
        texts += out.texts
        rewards += [reward_fn(p.text, t, p.answer) for p, t in zip(chunk, out.texts, strict=True)]
    return rewards, texts


def accuracy(rewards: list[float]) -> float:
    """Share of prompts whose reward reaches SOLVED_REWARD."""
    return sum(r >= SOLVED_REWARD for r in rewards) / len(rewards)


# -------------------------------------------------------------------------------------- train


def train_rl(config: RLConfig, progress: bool = True) -> RLResult:
    """Train `config.method` with RL on `config.dataset`; write adapter/ or model/, curves.json,
    eval_rewards.json and summary.json to `config.output_dir`.

    Raises:
        UserError: bad input (data, reward, targets, rank, output/resume paths), always before the
            first step and before anything is written.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    # ---- setup: checks, reward, prompts, model (nothing written until all of it succeeded) -----
    resume_from = life.preflight_dirs(config)
    final_dir, run_dir = life.run_dirs(config)
    reward_fn = load_reward(config.reward)  # python: rewards import the user's module here
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_seed(config.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    hf_logging.disable_progress_bar()
    say = tqdm.write

    tokenizer = load_base_tokenizer(config.model)
    data = prepare_prompts(config, tokenizer)
    say(f"data: {len(data.train)} train / {len(data.eval)} held-out prompts; reward {config.reward}; "
        f"{config.prompts_per_step} prompts x {config.group_size} samples per step")
    config_hash = config.hash(data.fingerprint)

    model, what = load_for_training(config, device.type == "cuda", device)
    trainable_params = count_trainable(model)
    say(f"trainable parameters: {trainable_params:,} ({what})")
    end_ids = end_token_ids(model, tokenizer)
    head, _ = loss_head(model)  # the chunked completion NLL where it is exact, else full logits

    episodes_per_step = config.prompts_per_step * config.group_size
    resume_state = None
    if resume_from is not None:
        resume_state = ckpt.read_state(resume_from)
        ckpt.check_resumable(resume_from, resume_state, config_hash, episodes_per_step, 1, "single")
    optimizer = life.build_optimizer(model, config, device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant LR (the paper's protocol)

    curves: dict[str, list] = {"train_reward": [], "signal_fraction": [], "eval_reward": [], "eval_accuracy": []}
    eval_rewards: list = []  # [step, per-prompt greedy rewards]
    counters = {"completion_tokens": 0, "sample_tokens": 0, "sample_s": 0.0, "train_tokens": 0, "train_s": 0.0}
    start_step = 0
    if resume_state is not None:
        ckpt.load_checkpoint(resume_from, model, optimizer, scheduler)
        start_step = resume_state["step"]
        curves, eval_rewards, counters = resume_state["curves"], resume_state["eval_rewards"], resume_state["counters"]
        say(f"resumed from {resume_from} at step {start_step}")

    # ---- from here on we write: the partial run directory, renamed to output_dir at the end -----
    life.open_run_dir(config, run_dir, resuming=resume_state is not None)

    final_texts: list[str] = []  # the last evaluation's greedy completions, kept as examples

    def write_curves() -> None:
        """curves.json and eval_rewards.json as they stand: a run stopped early still shows its curves
        in `<output_dir>.partial/` (the final write adds the completions as examples)."""
        (run_dir / "curves.json").write_text(json.dumps(curves, indent=1))
        (run_dir / EVAL_REWARDS_FILE).write_text(json.dumps({
            "prompt_ids": [p.key for p in data.eval],
            "rewards": eval_rewards,
            "examples": [{"prompt": p.text, "answer": p.answer, "completion": t}
                         for p, t in zip(data.eval[:20], final_texts, strict=False)],
        }))

    def evaluate(at_step: int) -> None:
        rewards, final_texts[:] = greedy_rewards(model, tokenizer, data.eval, reward_fn, max_new_tokens=config.max_new_tokens,
                                    batch_size=config.micro_batch_size, end_ids=end_ids)
        curves["eval_reward"].append([at_step, sum(rewards) / len(rewards)])
        curves["eval_accuracy"].append([at_step, accuracy(rewards)])
        eval_rewards.append([at_step, rewards])
        say(f"step {at_step}: held-out greedy reward {curves['eval_reward'][-1][1]:.3f}, "
            f"accuracy {curves['eval_accuracy'][-1][1]:.3f}" + (" (base model)" if at_step == 0 else ""))

    # ---- train --------------------------------------------------------------------------------
    evals_at = set(life.eval_steps(config.max_steps, config.eval_points))
    if start_step == 0:
        evaluate(0)
        write_curves()
    group, per_step = config.group_size, config.prompts_per_step
    bar = tqdm(range(start_step, config.max_steps), initial=start_step, total=config.max_steps,
               disable=not progress, desc=f"rl {config.method}")
    for step in bar:
        prompts = [data.train[i] for i in step_indices(len(data.train), step, per_step, config.seed)]
        # Sample: each prompt `group` times, seeded by (seed, step) so a resumed run samples alike.
        t0 = time.perf_counter()
        model.eval()
        torch.manual_seed(_sampling_seed(config.seed, step))
        rollouts = generate(model, [p.input_ids for p in prompts for _ in range(group)],
                            max_new_tokens=config.max_new_tokens, pad_id=tokenizer.pad_token_id, end_ids=end_ids,
                            greedy=False, tokenizer=tokenizer)
        sampled = sum(len(c) for c in rollouts.completions)
        counters["sample_s"] += time.perf_counter() - t0
        counters["sample_tokens"] += sampled
        counters["completion_tokens"] += sampled
        rewards = torch.tensor([reward_fn(prompts[i // group].text, text, prompts[i // group].answer)
                                for i, text in enumerate(rollouts.texts)], dtype=torch.float64)
        advantages = group_advantages(rewards.view(per_step, group), config.scale_rewards).flatten()

        # Policy gradient: Σ_i A_i · NLL_i / N, i.e. −(1/N) Σ_i A_i log π(y_i); only episodes with a
        # nonzero advantage contribute.
        t0 = time.perf_counter()
        model.train()
        rows = [i for i in range(episodes_per_step) if advantages[i] != 0]
        for start in range(0, len(rows), config.micro_batch_size):
            chunk = rows[start : start + config.micro_batch_size]
            batch = rollouts.batch(chunk, tokenizer.pad_token_id).to(device)
            weights = advantages[torch.tensor(chunk)].to(device, torch.float32)
            nll = completion_nll(model, batch, head=head, weights_B=weights)
            (nll.nll_sum / episodes_per_step).backward()
            counters["train_tokens"] += sum(len(rollouts.prompts[i]) + len(rollouts.completions[i]) for i in chunk)
        if rows:
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        counters["train_s"] += time.perf_counter() - t0

        train_reward = rewards.mean().item()
        curves["train_reward"].append([step + 1, train_reward])
        curves["signal_fraction"].append([step + 1, len(rows) / episodes_per_step])
        bar.set_postfix(reward=f"{train_reward:.3f}", signal=f"{len(rows) / episodes_per_step:.2f}")
        if step + 1 in evals_at:
            evaluate(step + 1)
        write_curves()
        if life.checkpoint_due(config, step + 1, config.max_steps):
            ckpt.save_checkpoint(
                run_dir, step + 1, model, optimizer, scheduler,
                {"config_hash": config_hash, "global_batch": episodes_per_step, "processes": 1, "sharding": "single",
                 "curves": curves, "eval_rewards": eval_rewards, "counters": counters},
                keep=config.keep_checkpoints,
            )
    bar.close()

    # ---- save ---------------------------------------------------------------------------------
    wall_s = time.perf_counter() - started
    # The policy-gradient steps' model FLOPs and MFU (sampling is generation, not a training step).
    episode_tokens = sum(len(p.input_ids) for p in data.train) / len(data.train) + config.max_new_tokens
    policy_throughput = life.Throughput(config, episode_tokens, device, 1)
    policy_throughput.add(counters["train_tokens"], counters["train_s"])
    peak_bytes, peak_kind = life.peak_memory(device)
    sub = "adapter" if config.method == "lora" else "model"
    result = RLResult(
        method=config.method,
        output_dir=str(final_dir),
        model_dir=str(final_dir / sub),
        curves_path=str(final_dir / "curves.json"),
        summary_path=str(final_dir / "summary.json"),
        rewards_path=str(final_dir / EVAL_REWARDS_FILE),
        base_eval_reward=curves["eval_reward"][0][1],
        base_eval_accuracy=curves["eval_accuracy"][0][1],
        final_eval_reward=curves["eval_reward"][-1][1],
        final_eval_accuracy=curves["eval_accuracy"][-1][1],
        final_train_reward=curves["train_reward"][-1][1],
        steps=config.max_steps,
        episodes=config.episodes,
        completion_tokens=counters["completion_tokens"],
        wall_s=round(wall_s, 3),
        sample_tokens_per_s=round(counters["sample_tokens"] / counters["sample_s"], 1) if counters["sample_s"] else 0.0,
        train_tokens_per_s=round(counters["train_tokens"] / counters["train_s"], 1) if counters["train_s"] else 0.0,
        peak_memory_bytes=int(peak_bytes),
        peak_memory_kind=peak_kind,
        trainable_params=trainable_params,
        config_hash=config_hash,
    )
    save_trained(model, tokenizer, run_dir / sub, method=config.method, base_ref=config.model)
    write_curves()
    summary = {
        **result.to_dict(),
        "config": config.to_dict(),
        "data": data.stats,
        "data_fingerprint": data.fingerprint,
        "heldout_fingerprint": heldout_fingerprint([p.key for p in data.eval]),
        "resumed_from_step": start_step or None,
        "device": str(device),
        "timing_s": {"sampling": round(counters["sample_s"], 3), "policy_gradient": round(counters["train_s"], 3)},
        "throughput": policy_throughput.summary(),
        "versions": life.versions(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    life.finalize(run_dir, final_dir)
    say(
        f"done: {result.steps} steps, {result.episodes:,} episodes, {result.wall_s:.1f} s "
        f"(sampling {result.sample_tokens_per_s:,.0f} tokens/s, policy gradient {result.train_tokens_per_s:,.0f} "
        f"tokens/s); held-out accuracy {result.base_eval_accuracy:.3f} -> {result.final_eval_accuracy:.3f} "
        f"-> {final_dir}"
    )
    return result


def heldout_fingerprint(prompt_ids: list[str]) -> str:
    """16 hex chars naming the ordered held-out prompts: two runs are comparable only if they agree."""
    return hashlib.sha256(" ".join(prompt_ids).encode()).hexdigest()[:16]
