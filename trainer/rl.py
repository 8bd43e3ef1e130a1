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

Sampling draws each episode with its own seed, (seed, step, prompt position, sample index), through
inverse-CDF sampling with one hashed uniform per token (seeded rows of `trainer.generation`, the
one generation helper, also the server's), so an episode's completion depends neither on the other rows
of its batch nor on the process that samples it: a resumed run, and a run on any number of processes,
draws exactly the episodes the uninterrupted one-process run drew. Held-out evaluation is greedy, at
log-spaced steps: the mean reward and the accuracy (share of prompts whose reward reaches
`trainer.rewards.SOLVED_REWARD`), with each prompt's reward kept for the paired comparison of LoRA
with FullFT (evaluation/rl.py).

Several processes (`launch.processes`, started by `trainer.launch` under torchrun): each samples and
scores whole groups (the step's prompts split in equal blocks, hence `prompts_per_step` divisible by
the processes), and the policy gradient is summed over all of them: DDP for LoRA, FSDP2 for FullFT
(trainer/distributed.py), as in the supervised loop. Every process runs as many forwards as the
others (zero-weight micro-batches where it has fewer episodes with signal; transformers'
`synced_gpus` while generating under FSDP2), because FSDP's all-gathers and DDP's all-reduces are
collectives. The held-out prompts are shared out and their rewards gathered.

The run's lifecycle is the supervised loop's (trainer/lifecycle.py: preflight, the partial folder,
the resume check, the optimizer, the eval and checkpoint cadence, finalize): everything goes to
`<output_dir>.partial/` and is renamed at the end.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field

import torch

from data.dataset import IGNORE_INDEX, RL_COLUMNS
from data.errors import UserError
from data.render import Renderer
from data.sources import load_tokenizer, loadable_path
from trainer import checkpoint as ckpt
from trainer import distributed
from trainer import lifecycle as life
from trainer.data import Sequence, collate, load_split, step_indices
from trainer.generation import GenerationRequest, generate_batch, hashed_seed
from trainer.loss import completion_nll, loss_head
from trainer.model import count_trainable, load_for_training, save_trained
from trainer.result import EVAL_SCORES_FILE, RL, scores_record
from trainer.rewards import SOLVED_REWARD, load_reward
from trainer.rl_config import RLConfig, RLResult

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


def prepare_prompts(config: RLConfig, renderer: Renderer) -> PromptData:
    """Load, split and tokenize the prompts of `config`: each is a chat (a string prompt is one user turn)
    rendered up to the opened assistant turn, or, for a tokenizer without a chat template, a string
    prompt's raw text (`Renderer.prompt`).

    Raises:
        UserError: no rows, a row without prompt or answer, a prompt longer than max_prompt_tokens.
    """
    from data.dataset import dataset_fingerprint

    _, train_rows, eval_rows = load_split(config)

    def encode(row_list: list[dict], source: str) -> list[Prompt]:
        prompts = []
        for i, row in enumerate(row_list):
            if not isinstance(row, dict):
                raise UserError(f"{source}: row {i} is not an object with 'prompt' and 'answer'.")
            messages, text = _messages(row, i, source)
            answer = _answer(row, i, source)
            plain = isinstance(row["prompt"], str) and not renderer.has_chat_template
            ids = renderer.prompt(text if plain else messages, at=f"{source}: row {i}'s prompt")
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
    first = train_rows[0] if isinstance(train_rows[0], dict) else {}
    stats = {"train_prompts": len(train), "eval_prompts": len(evals),
             "max_prompt_tokens_seen": max(len(p.input_ids) for p in train + evals),
             "columns": config.columns, "ignored_columns": sorted(set(first) - set(RL_COLUMNS))}
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


def sample(model, renderer: Renderer, prompts: list[tuple[int, ...]], *, max_new_tokens: int,
           seeds: list[int] | None, synced: bool = False) -> Rollouts:
    """Complete each prompt once, in one batch (`trainer.generation.generate_batch`): greedy when `seeds` is
    None, else sampled at temperature 1 (no top-k or top-p: the draws come from the policy's own
    distribution) with row i's draws seeded by seeds[i] alone, so a row's completion does not depend on
    the other rows of its batch, nor on which process samples it. `synced`: under FSDP2."""
    requests = [GenerationRequest(ids, max_new_tokens, temperature=0.0 if seeds is None else 1.0,
                                  seed=None if seeds is None else seeds[row]) for row, ids in enumerate(prompts)]
    results = generate_batch(model, renderer, requests, synced=synced)
    return Rollouts(list(prompts), [r.completion_ids for r in results], [r.text for r in results])


def sample_seeds(seed: int, step: int, positions: range, group: int) -> list[int]:
    """The sampling seeds of a step's episodes: prompt position p's j-th sample gets (seed, step, p, j).
    The same on any number of processes, and on resume."""
    return [hashed_seed(seed, step, p, j) for p in positions for j in range(group)]


def group_advantages(rewards_P_G: torch.Tensor, scale: bool) -> torch.Tensor:
    """Reward minus its group's mean (GRPO's baseline); divided by the group's std when `scale`."""
    centred = rewards_P_G - rewards_P_G.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (rewards_P_G.std(dim=1, keepdim=True) + 1e-6)
    return centred


# ---------------------------------------------------------------------------------- evaluation


def greedy_rewards(model, renderer: Renderer, prompts: list[Prompt], reward_fn, *, max_new_tokens: int,
                   batch_size: int, accelerator=None, synced: bool = False) -> tuple[list[float], list[str]]:
    """Each held-out prompt's reward for its greedy completion, and the completions, in prompt order.

    With an `accelerator` of several processes the prompts are shared out (rank r takes r, r + P, ...)
    and every process ends with all rewards and completions: each fills its prompts' slots of zero
    tensors and a sum-reduction assembles them. Every process decodes as many batches (one short of
    prompts decodes its first batch again and drops it): under FSDP the forwards are collectives.
    """
    model.eval()
    world, rank = (1, 0) if accelerator is None else (accelerator.num_processes, accelerator.process_index)
    device = next(model.parameters()).device
    rewards_N = torch.zeros(len(prompts), dtype=torch.float64, device=device)
    tokens_N_T = torch.zeros((len(prompts), max_new_tokens), dtype=torch.long, device=device)  # token + 1; 0 = none
    mine = list(range(rank, len(prompts), world))
    for k in range(math.ceil(math.ceil(len(prompts) / world) / batch_size)):
        rows = mine[k * batch_size : (k + 1) * batch_size]
        out = sample(model, renderer, [prompts[i].input_ids for i in rows or mine[:batch_size] or [0]],
                     max_new_tokens=max_new_tokens, seeds=None, synced=synced)
        for i, completion, text in zip(rows, out.completions, out.texts, strict=False):  # no rows: all dropped
            rewards_N[i] = reward_fn(prompts[i].text, text, prompts[i].answer)
            tokens_N_T[i, : len(completion)] = torch.tensor(completion, device=device) + 1
    if world > 1:
        rewards_N, tokens_N_T = accelerator.reduce(rewards_N, reduction="sum"), accelerator.reduce(tokens_N_T, "sum")
    texts = [renderer.decode([t - 1 for t in row if t > 0]) for row in tokens_N_T.tolist()]
    return rewards_N.tolist(), texts


def accuracy(rewards: list[float]) -> float:
    """Share of prompts whose reward reaches SOLVED_REWARD."""
    return sum(r >= SOLVED_REWARD for r in rewards) / len(rewards)


# -------------------------------------------------------------------------------------- train


def train_rl(config: RLConfig, progress: bool = True) -> RLResult:
    """Train `config.method` with RL on `config.dataset`; write adapter/ or model/, curves.json,
    eval_scores.json and summary.json to `config.output_dir`. Runs as is in one process, and as
    every rank of a torchrun launch (`trainer.launch`; module docstring, "Several processes").

    Raises:
        UserError: bad input (data, reward, targets, rank, output/resume paths), always before the
            first step and before anything is written.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    finished = life.finished_result(config, RLResult, functools.partial(print, flush=True))
    if finished is not None:
        return finished
    # ---- setup: checks, reward, prompts, model (nothing written until all of it succeeded) -----
    resume_from = life.preflight_dirs(config)
    final_dir, run_dir = life.run_dirs(config)
    reward_fn = load_reward(config.reward)  # python: rewards import the user's module here
    use_cuda = torch.cuda.is_available()
    # No autocast: RL keeps the precision it loads (a bf16 frozen base for LoRA on CUDA, fp32 otherwise).
    accelerator = distributed.make_accelerator("no", use_cuda)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    sharding = distributed.choose_sharding(config.launch.sharding, config.method, world)
    set_seed(config.seed)
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    hf_logging.disable_progress_bar()

    def say(message: str) -> None:  # main process only; tqdm.write keeps the progress bar intact
        if accelerator.is_main_process:
            tqdm.write(message)

    if world > 1:
        say(f"processes: {world}, sharding: {sharding}")
    with accelerator.main_process_first():  # one process converts a GGUF base into the cache, the others read it
        loadable_path(config.model)
        tokenizer = load_tokenizer(config.model)
    renderer = Renderer(tokenizer)
    data = prepare_prompts(config, renderer)
    say(f"data: {len(data.train)} train / {len(data.eval)} held-out prompts; reward {config.reward}; "
        f"{config.prompts_per_step} prompts x {config.group_size} samples per step"
        + (f"; columns ignored: {', '.join(data.stats['ignored_columns'])}" if data.stats["ignored_columns"] else ""))
    config_hash = config.hash(data.fingerprint)

    model, what = load_for_training(config, use_cuda, device)
    trainable_params = count_trainable(model)
    say(f"trainable parameters: {trainable_params:,} ({what})")

    episodes_per_step = config.prompts_per_step * config.group_size
    resume_state = None
    if resume_from is not None:
        resume_state = ckpt.read_state(resume_from)
        ckpt.check_resumable(resume_from, resume_state, config_hash, episodes_per_step, world, sharding)
        ckpt.check_state(resume_from, resume_state, config.max_steps, "train_reward")
    if sharding == "fsdp":
        from torch.distributed.fsdp import register_fsdp_forward_method

        layers = distributed.shard_model(model, distributed.device_mesh(device, world), "no")
        # generate() runs the model outside its forward (peft calls the base model's): FSDP2 gathers
        # the root's parameters around the whole call.
        register_fsdp_forward_method(model, "generate")
        say(f"FSDP2: {layers} decoder layers and the model sharded over {world} processes")
    optimizer = life.build_optimizer(model, config, use_cuda)
    if sharding == "ddp":
        model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant LR (the paper's protocol)
    policy = accelerator.unwrap_model(model) if sharding == "ddp" else model  # what samples: no DDP wrapper
    synced = sharding == "fsdp"
    head, _ = loss_head(policy, sharded=synced)  # the chunked completion NLL where it is exact, else full logits

    curves: dict[str, list] = {"train_reward": [], "signal_fraction": [], "eval_reward": [], "eval_accuracy": []}
    eval_rewards: list = []  # [step, per-prompt greedy rewards]
    counters = {"completion_tokens": 0, "sample_tokens": 0, "sample_s": 0.0, "train_tokens": 0, "train_s": 0.0}
    start_step = 0
    if resume_state is not None:
        ckpt.load_checkpoint(resume_from, policy, optimizer, scheduler, sharded=synced)
        start_step = resume_state["step"]
        curves, eval_rewards, counters = resume_state["curves"], resume_state["eval_rewards"], resume_state["counters"]
        say(f"resumed from {resume_from} at step {start_step}")

    # ---- from here on we write: the partial run directory, renamed to output_dir at the end -----
    if accelerator.is_main_process:
        life.open_run_dir(config, run_dir, resuming=resume_state is not None)
    accelerator.wait_for_everyone()

    final_texts: list[str] = []  # the last evaluation's greedy completions, kept as examples

    def write_curves() -> None:
        """curves.json and eval_scores.json as they stand: a run stopped early still shows its curves
        in `<output_dir>.partial/` (the final write adds the completions as examples)."""
        if not accelerator.is_main_process:
            return
        (run_dir / "curves.json").write_text(json.dumps(curves, indent=1))
        (run_dir / EVAL_SCORES_FILE).write_text(json.dumps(scores_record(
            RL, [p.key for p in data.eval], [1.0] * len(data.eval), eval_rewards,
            [{"prompt": p.text, "answer": p.answer, "completion": t}
             for p, t in zip(data.eval[:20], final_texts, strict=False)])))

    def evaluate(at_step: int) -> None:
        rewards, final_texts[:] = greedy_rewards(
            policy, renderer, data.eval, reward_fn, max_new_tokens=config.max_new_tokens,
            batch_size=config.micro_batch_size, accelerator=accelerator, synced=synced)
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
    group, per_rank = config.group_size, config.prompts_per_step // world
    positions = range(rank * per_rank, (rank + 1) * per_rank)  # this process's prompts of each step: whole groups
    bar = tqdm(range(start_step, config.max_steps), initial=start_step, total=config.max_steps,
               disable=not (progress and accelerator.is_main_process), desc=f"rl {config.method}")
    for step in bar:
        order = step_indices(len(data.train), step, config.prompts_per_step, config.seed)
        prompts = [data.train[order[p]] for p in positions]
        # Sample: each prompt `group` times, each episode seeded by (seed, step, position, sample).
        t0 = time.perf_counter()
        policy.eval()
        rollouts = sample(policy, renderer, [p.input_ids for p in prompts for _ in range(group)],
                          max_new_tokens=config.max_new_tokens, seeds=sample_seeds(config.seed, step, positions, group),
                          synced=synced)
        sample_s = time.perf_counter() - t0
        rewards = torch.tensor([reward_fn(prompts[i // group].text, text, prompts[i // group].answer)
                                for i, text in enumerate(rollouts.texts)], dtype=torch.float64)
        advantages = group_advantages(rewards.view(per_rank, group), config.scale_rewards).flatten()

        # Policy gradient: Σ_i A_i · NLL_i / N over all processes' episodes, i.e. −(1/N) Σ_i A_i log π(y_i);
        # only episodes with a nonzero advantage contribute. Every process runs as many micro-batches
        # (the most any needs; zero-weight ones where it has fewer) and syncs gradients on the last.
        t0 = time.perf_counter()
        model.train()
        rows = [i for i in range(len(rollouts.texts)) if advantages[i] != 0]
        micro = config.micro_batch_size
        counts = distributed.gathered_counts(accelerator, len(rows), -(-len(rows) // micro))
        signal_rows, passes = int(counts[:, 0].sum()), int(counts[:, 1].max())
        train_tokens = 0
        loss_sum = torch.zeros((), device=device)
        for k in range(passes):
            chunk = rows[k * micro : (k + 1) * micro]
            batch = rollouts.batch(chunk or [0], renderer.pad_id).to(device)
            weights = (advantages[torch.tensor(chunk)] if chunk else torch.zeros(1)).to(device, torch.float32)
            with distributed.gradient_sync(model, sharding, accelerator, enabled=k == passes - 1):
                nll = completion_nll(model, batch, head=head, weights_B=weights)
                loss_sum = loss_sum + nll.nll_sum.detach().float()
                accelerator.backward(nll.nll_sum * (world / episodes_per_step))  # DDP and FSDP average over processes
            train_tokens += sum(len(rollouts.prompts[i]) + len(rollouts.completions[i]) for i in chunk)
        # Summed over every process (a collective all of them run), so all stop together on a non-finite loss.
        life.check_finite("policy-gradient loss", accelerator.reduce(loss_sum, reduction="sum").item(), step + 1, config)
        if signal_rows:
            if config.max_grad_norm is not None and sharding == "fsdp":  # the norm of DTensor gradients is global
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            elif config.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sampled = sum(len(c) for c in rollouts.completions)
        totals = distributed.gathered_counts(accelerator, sampled, train_tokens).sum(dim=0).tolist()
        train_reward = accelerator.gather(rewards.to(device)).mean().item()  # over all processes' episodes
        counters["completion_tokens"] += totals[0]
        counters["sample_tokens"] += totals[0]
        counters["train_tokens"] += totals[1]
        counters["sample_s"] += sample_s  # this process's wall time: the processes sample at once
        counters["train_s"] += time.perf_counter() - t0

        curves["train_reward"].append([step + 1, train_reward])
        curves["signal_fraction"].append([step + 1, signal_rows / episodes_per_step])
        bar.set_postfix(reward=f"{train_reward:.3f}", signal=f"{signal_rows / episodes_per_step:.2f}")
        if step + 1 in evals_at:
            evaluate(step + 1)
        write_curves()
        if life.checkpoint_due(config, step + 1, config.max_steps):
            state = {"config_hash": config_hash, "global_batch": episodes_per_step, "processes": world,
                     "sharding": sharding, "curves": curves, "eval_rewards": eval_rewards, "counters": counters}
            if sharding == "fsdp" or accelerator.is_main_process:  # under FSDP2 every rank writes its shards
                ckpt.save_checkpoint(run_dir, step + 1, policy, optimizer, scheduler, state,
                                     keep=config.keep_checkpoints, sharded=synced,
                                     is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone)
            accelerator.wait_for_everyone()
    bar.close()

    # ---- save ---------------------------------------------------------------------------------
    wall_s = time.perf_counter() - started
    # The policy-gradient steps' model FLOPs and MFU (sampling is generation, not a training step).
    episode_tokens = sum(len(p.input_ids) for p in data.train) / len(data.train) + config.max_new_tokens
    policy_throughput = life.Throughput(config, episode_tokens, device, world)
    policy_throughput.add(counters["train_tokens"], counters["train_s"])
    peak_bytes, peak_kind = life.peak_memory(device)
    sub = "adapter" if config.method == "lora" else "model"
    result = RLResult(
        method=config.method,
        output_dir=str(final_dir),
        model_dir=str(final_dir / sub),
        curves_path=str(final_dir / "curves.json"),
        summary_path=str(final_dir / "summary.json"),
        scores_path=str(final_dir / EVAL_SCORES_FILE),
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
    # Gathers FSDP shards (a collective: every process calls it); peft keeps only the adapter's keys.
    state_dict = distributed.full_state_dict(model) if synced else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_trained(policy, tokenizer, run_dir / sub, method=config.method, base_ref=config.model,
                     state_dict=state_dict)
        write_curves()
        summary = {
            **result.to_dict(),
            "config": config.to_dict(),
            "data": data.stats,
            "data_fingerprint": data.fingerprint,
            "heldout_fingerprint": heldout_fingerprint([p.key for p in data.eval]),
            "resumed_from_step": start_step or None,
            "processes": world,
            "sharding": sharding,
            "sharded_parameters": distributed.is_sharded(model),
            "device": str(device),
            "timing_s": {"sampling": round(counters["sample_s"], 3), "policy_gradient": round(counters["train_s"], 3)},
            "throughput": policy_throughput.summary(),
            "versions": life.versions(),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        life.finalize(run_dir, final_dir)
    accelerator.wait_for_everyone()
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
