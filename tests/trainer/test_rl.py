"""The RL loop on a tiny model: the policy-gradient math, exact resume, files, bad input refused early."""

import json
from pathlib import Path

import pytest
import torch

from data.errors import UserError
from data.render import Renderer
from trainer.generation import GenerationRequest, row_sampler
from trainer.loss import completion_nll, loss_head
from trainer.result import EVAL_SCORES_FILE
from trainer.rl import group_advantages, prepare_prompts, sample, sample_seeds, train_rl
from trainer.rl_config import RLConfig, load_rl_config

VOWELS = "python:tests.trainer.rl_task:vowel_share"
RL_PRESETS = sorted((Path(__file__).parents[2] / "configs" / "rl").glob("*.yaml"))


def write_prompts(path, n=40):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"say {i % 7} and {i % 5}", "answer": str(i % 7 + i % 5)}) + "\n")
    return path


@pytest.fixture
def rl_config(tiny_models, tmp_path):
    """Factory of small, fast RLConfigs on the tiny llama."""
    data = write_prompts(tmp_path / "prompts.jsonl")

    def make(**overrides):
        fields = dict(model=str(tiny_models("llama")), dataset=str(data), reward=VOWELS, method="lora", rank=2,
                      lr=3e-2, max_steps=4, prompts_per_step=2, group_size=4, max_new_tokens=4, eval_points=3,
                      eval_max_examples=6, checkpoint_every=0, output_dir=str(tmp_path / "run"))
        return RLConfig(**(fields | overrides))

    return make


def test_group_advantages_are_reward_minus_group_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    assert group_advantages(rewards, scale=False).tolist() == [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0],
                                                               [-0.75, -0.75, -0.75, 2.25]]
    scaled = group_advantages(rewards, scale=True)
    assert scaled[0].tolist() == pytest.approx([0.866, -0.866, -0.866, 0.866], abs=1e-3)  # ÷ std 0.577
    assert scaled[1].tolist() == [0, 0, 0, 0]  # no spread: no signal, no division by zero


def _tiny(tiny_models):
    from data.sources import load_tokenizer
    from trainer.model import load_base_model

    return load_base_model(str(tiny_models("llama"))).eval(), load_tokenizer(str(tiny_models("llama")))


def _nll(model, rollouts, rows, tokenizer, head=None, weights=None):
    return completion_nll(model, rollouts.batch(rows, tokenizer.pad_token_id), head=head, weights_B=weights)


def _sample(model, tokenizer, prompts, seed, max_new_tokens=5):
    return sample(model, Renderer(tokenizer), prompts, max_new_tokens=max_new_tokens,
                  seeds=[seed * 1000 + i for i in range(len(prompts))])


def test_seeded_sampling_draws_from_the_softmax():
    """The generation helper's draws for seeded rows (its argmax) over 20,000 seeds: the frequencies are softmax(logits)
    (chi-square, 3 degrees of freedom, far below the 0.1% critical value 16.3), and a row's draw depends
    only on its seed and position."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    rows = 20_000
    def seeded(seeds):
        return [GenerationRequest((0, 0, 0), 1, temperature=1.0, seed=seed) for seed in seeds]

    processor = row_sampler(seeded(range(rows)), prompt_len=3)
    draws = processor(torch.zeros((rows, 3), dtype=torch.long), logits.expand(rows, 4).clone()).argmax(-1)
    expected = torch.softmax(logits, -1) * rows
    chi2 = (((torch.bincount(draws, minlength=4) - expected) ** 2) / expected).sum().item()
    assert chi2 < 16.3, chi2
    alone = row_sampler(seeded([7]), prompt_len=3)(torch.zeros((1, 3), dtype=torch.long), logits[None].clone())
    assert alone.argmax(-1).item() == draws[7].item()
    later = row_sampler(seeded(range(rows)), prompt_len=2)(torch.zeros((rows, 3), dtype=torch.long),
                                                          logits.expand(rows, 4).clone()).argmax(-1)
    assert (later != draws).any()  # the next token's noise is new


def test_an_episode_is_the_same_in_any_batch(tiny_models):
    """What makes a run on 2 processes draw what 1 draws: an episode's completion, sampled with its seed,
    is the same alone as beside other prompts of other lengths."""
    model, tokenizer = _tiny(tiny_models)
    prompts = [tuple(tokenizer(text)["input_ids"]) for text in ("say one", "a much longer prompt here", "x")]
    seeds = sample_seeds(0, 3, range(3), 1)
    renderer = Renderer(tokenizer)
    together = sample(model, renderer, prompts, max_new_tokens=6, seeds=seeds)
    for row in range(3):
        alone = sample(model, renderer, prompts[row:row + 1], max_new_tokens=6, seeds=seeds[row:row + 1])
        assert alone.completions[0] == together.completions[row]
    assert len({tuple(c) for c in together.completions}) > 1


def test_episode_nll_is_each_sequence_alone(tiny_models):
    """Sampled left-padded, scored right-padded with the trainer's NLL: each row's NLL equals a plain
    forward pass over that prompt + completion alone."""
    model, tokenizer = _tiny(tiny_models)
    prompts = [tuple(tokenizer("say one")["input_ids"]), tuple(tokenizer("a much longer prompt here")["input_ids"])]
    rollouts = _sample(model, tokenizer, prompts, seed=0)
    with torch.no_grad():
        batched = _nll(model, rollouts, [0, 1], tokenizer, head=loss_head(model)[0]).example_nll_B
        for row, prompt in enumerate(prompts):
            completion = torch.tensor(rollouts.completions[row])
            ids = torch.cat([torch.tensor(prompt), completion])[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].float(), -1)
            alone = -logp.gather(-1, completion[:, None]).sum()
            assert batched[row].item() == pytest.approx(alone.item(), abs=1e-4)


def test_completions_stop_at_the_first_end_token(tiny_models):
    model, tokenizer = _tiny(tiny_models)
    eos = tokenizer.eos_token_id
    rollouts = _sample(model, tokenizer, [tuple(tokenizer("x")["input_ids"])] * 16, seed=1, max_new_tokens=6)
    for completion in rollouts.completions:
        assert 1 <= len(completion) <= 6
        assert eos not in completion[:-1]  # an end token only ever closes a completion


def test_weighted_nll_chunked_equals_full_logits(tiny_models):
    """The advantage-weighted NLL (the policy-gradient loss): same value and gradients on both paths."""
    model, tokenizer = _tiny(tiny_models)
    rollouts = _sample(model, tokenizer, [tuple(tokenizer("say one")["input_ids"])] * 6, seed=3)
    weights = torch.tensor([1.5, -0.5, 0.0, 2.0, -1.0, -2.0])
    results = []
    for head in (loss_head(model)[0], None):
        model.zero_grad()
        nll = _nll(model, rollouts, list(range(6)), tokenizer, head=head, weights=weights)
        nll.nll_sum.backward()
        assert nll.nll_sum.item() == pytest.approx((weights.double() * nll.example_nll_B).sum().item(), abs=1e-4)
        results.append((nll.nll_sum.item(), [p.grad.clone() for p in model.parameters()]))
    (chunked, chunked_grads), (full, full_grads) = results
    assert chunked == pytest.approx(full, abs=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(chunked_grads, full_grads, strict=True))


def test_one_step_raises_the_logprob_of_better_than_average_samples(tiny_models):
    """The loss's sign: after one update, Σ advantage × Δ log π > 0."""
    model, tokenizer = _tiny(tiny_models)
    model.train()
    rollouts = _sample(model, tokenizer, [tuple(tokenizer("say one")["input_ids"])] * 8, seed=2, max_new_tokens=4)
    advantages = group_advantages(torch.arange(8.0)[None], scale=False).flatten()  # any spread will do
    with torch.no_grad():
        before = -_nll(model, rollouts, list(range(8)), tokenizer).example_nll_B
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    (_nll(model, rollouts, list(range(8)), tokenizer, head=loss_head(model)[0], weights=advantages).nll_sum / 8).backward()
    optimizer.step()
    with torch.no_grad():
        after = -_nll(model, rollouts, list(range(8)), tokenizer).example_nll_B
    assert (advantages.double() * (after - before)).sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("method, lr, trainable", [("lora", 3e-2, 2 * 2 * (4 * 64 + 2 * (64 + 32) + 3 * (64 + 128))),
                                                   ("full", 1e-3, None)])
def test_run_writes_its_files_and_reloads(rl_config, method, lr, trainable):
    from trainer.model import load_trained
    from trainer.rewards import load_reward
    from trainer.rl import greedy_rewards

    config = rl_config(method=method, lr=lr)
    result = train_rl(config, progress=False)
    out = Path(result.output_dir)
    assert {p.name for p in out.iterdir()} >= {"config.json", "curves.json", "summary.json", EVAL_SCORES_FILE,
                                               "adapter" if method == "lora" else "model"}
    assert not out.with_name(out.name + ".partial").exists()
    curves = json.loads(Path(result.curves_path).read_text())
    assert [s for s, _ in curves["train_reward"]] == [1, 2, 3, 4]
    assert [s for s, _ in curves["eval_accuracy"]] == [0, 1, 4]  # log-spaced: eval_steps(4, 3)
    record = json.loads(Path(result.scores_path).read_text())
    assert (record["objective"], record["score"], record["weights"]) == ("rl", "reward", [1.0] * 4)
    assert len(record["ids"]) == 4 and [s for s, _ in record["by_step"]] == [0, 1, 4]  # 10% of 40
    assert result.episodes == 4 * 2 * 4 and result.completion_tokens > 0
    assert result.sample_tokens_per_s > 0 and result.train_tokens_per_s > 0
    if trainable:
        assert result.trainable_params == trainable

    # The saved model gives the final greedy rewards again.
    model, tokenizer = load_trained(result.output_dir)
    renderer = Renderer(tokenizer)
    data = prepare_prompts(config, renderer)
    rewards, _ = greedy_rewards(model, renderer, data.eval, load_reward(config.reward), max_new_tokens=4,
                                batch_size=8)
    assert rewards == pytest.approx(record["by_step"][-1][1], abs=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_exactly(rl_config, monkeypatch, tmp_path):
    """A run stopped right after its step-2 checkpoint and resumed equals the uninterrupted run."""
    from safetensors.torch import load_file

    from trainer import checkpoint

    whole = train_rl(rl_config(output_dir=str(tmp_path / "whole"), checkpoint_every=2), progress=False)

    save = checkpoint.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # as a kill right after the checkpoint is complete

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    config = rl_config(output_dir=str(tmp_path / "resumed"), checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train_rl(config, progress=False)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    assert not Path(config.output_dir).exists()
    # The stopped run's curves so far are readable in its partial directory.
    partial = json.loads((Path(config.output_dir + ".partial") / "curves.json").read_text())
    assert [s for s, _ in partial["train_reward"]] == [1, 2] and [s for s, _ in partial["eval_reward"]] == [0, 1]
    resumed = train_rl(rl_config(output_dir=str(tmp_path / "resumed"), checkpoint_every=2, resume="auto"),
                       progress=False)

    assert json.loads(Path(resumed.curves_path).read_text()) == json.loads(Path(whole.curves_path).read_text())
    a = load_file(Path(whole.model_dir) / "adapter_model.safetensors")
    b = load_file(Path(resumed.model_dir) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(Path(resumed.summary_path).read_text())["resumed_from_step"] == 2


@pytest.mark.slow
def test_lora_and_full_see_the_same_prompts_in_the_same_order(rl_config, monkeypatch):
    import trainer.rl as rl

    seen = {}
    real = rl.sample

    def spy(model, renderer, prompts, **kwargs):
        if kwargs["seeds"] is not None:
            seen.setdefault(method, []).append(prompts)
        return real(model, renderer, prompts, **kwargs)

    monkeypatch.setattr(rl, "sample", spy)
    for method, lr in (("lora", 3e-2), ("full", 1e-3)):
        train_rl(rl_config(method=method, lr=lr, max_steps=3, eval_points=2, overwrite=True), progress=False)
    assert seen["lora"] == seen["full"] and len(seen["lora"]) == 3


@pytest.mark.parametrize("rows, overrides, says", [
    ([{"prompt": "q"}], {}, "no usable 'answer'"),
    ([{"question": "q", "answer": "1"}], {}, "no usable 'prompt'"),
    ([{"prompt": "q", "answer": True}], {}, "no usable 'answer'"),
    ([{"prompt": "word " * 80, "answer": "1"}], {"max_prompt_tokens": 16}, "max_prompt_tokens=16"),
    (None, {"reward": "python:no_such_module_xyz:score"}, "cannot import"),
])
def test_bad_input_fails_before_anything_is_written(rl_config, tmp_path, rows, overrides, says):
    config = rl_config(**overrides)
    if rows is not None:
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows * 10))
        config = rl_config(dataset=str(path), **overrides)
    with pytest.raises(UserError, match=says):
        train_rl(config, progress=False)
    out = Path(config.output_dir)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.mark.parametrize("overrides, says", [
    ({"group_size": 1}, "group_size=1"),
    ({"reward": "contains"}, "not a reward spec"),
    ({"method": "rl"}, "method='rl'"),
    ({"eval_points": 1}, "eval_points=1"),
    ({"resume": "auto", "overwrite": True}, "contradict"),
    ({"max_steps": 0}, "max_steps=0"),
    ({"prompts_per_step": "8x"}, "whole number"),
    ({"typo": 1}, "Unknown RL option"),
    ({"prompts_per_step": 3, "launch": {"processes": 2}}, "prompts_per_step=3 does not divide among 2 processes"),
])
def test_config_refuses_bad_values(overrides, says):
    with pytest.raises(UserError, match=says):
        RLConfig.from_dict(overrides)


def test_defaults_and_overrides():
    config = load_rl_config(None, ["method=full", "lr=3e-5", "group_size=4"])
    assert (config.method, config.lr, config.group_size, config.rank) == ("full", 3e-5, 4, 1)
    assert RLConfig().lr == 5e-4 and RLConfig(method="full").lr == 5e-5
    assert RLConfig(max_steps=10, prompts_per_step=4, group_size=8).episodes == 320
    assert RLConfig().hash("x") == RLConfig(output_dir="elsewhere", checkpoint_every=3).hash("x")
    assert RLConfig().hash("x") != RLConfig(group_size=4).hash("x")


@pytest.mark.parametrize("preset", RL_PRESETS, ids=lambda p: p.name)
def test_every_rl_preset_loads(preset):
    assert load_rl_config(preset).dataset


@pytest.mark.parametrize("overrides, says", [
    (["rank=0"], "rank=0"),
    (["typo=1"], "Unknown RL option"),
    (["reward=python:no_such_module_xyz:score"], "cannot import"),
    (["dataset=DATA/missing.jsonl"], "not found"),
    (["output_dir=EXISTING"], "EXISTING"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(rl_config, tmp_path, capsys, overrides, says):
    from flows.cli import main

    existing = tmp_path / "finished"
    existing.mkdir()
    (existing / "summary.json").write_text("{}")
    config = rl_config()
    out = tmp_path / "run"
    args = [f"model={config.model}", f"dataset={config.dataset}", f"output_dir={out}"]
    args += [o.replace("DATA", str(tmp_path)).replace("EXISTING", str(existing)) for o in overrides]
    before = sorted(tmp_path.rglob("*"))
    assert main(["rl-train", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert says.replace("EXISTING", str(existing)) in err and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before  # no run, no .partial, the finished run untouched
