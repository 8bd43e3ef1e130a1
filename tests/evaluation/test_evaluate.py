"""evaluate_nll / evaluate_run / `lowregret evaluate` on a tiny model and a JSONL file."""

import json

import pytest

from data.errors import UserError
from flows.cli import main

ROWS = [
    {"prompt": f"What does function number {i} return?", "completion": f"It returns {i * 7} and a path."}
    for i in range(12)
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_models("llama")),
        LoraConfig(r=4, lora_alpha=32, target_modules="all-linear"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    return str(out)


def expected_tokens(model_dir, rows, max_length):
    from data.dataset import detect_format
    from data.render import Renderer
    from data.sources import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    fmt = detect_format(rows)
    examples = [Renderer(tok).example(r, fmt, max_length) for r in rows]
    return sum(sum(label != -100 for label in e.labels[1:]) for e in examples)


def test_evaluate_nll_counts_every_completion_token_and_ignores_batching(tiny_models, data):
    from evaluation.nll import evaluate_nll

    model = str(tiny_models("llama"))
    one = evaluate_nll(model, None, data, max_length=64, batch_size=1, device="cpu")
    many = evaluate_nll(model, None, data, max_length=64, batch_size=5, device="cpu")
    assert one.examples == many.examples == len(ROWS)
    assert one.tokens == many.tokens == expected_tokens(model, ROWS, 64)
    assert many.nats_per_token == pytest.approx(one.nats_per_token, rel=1e-5)


def test_held_out_split_and_first_n(tiny_models, data):
    from data.split import split_indices
    from evaluation.nll import evaluate_nll

    model = str(tiny_models("llama"))
    held_out = [ROWS[i] for i in split_indices(len(ROWS), 0.25, 3)[1]]
    r = evaluate_nll(model, None, data, max_length=64, eval_fraction=0.25, seed=3, device="cpu")
    assert r.examples == len(held_out)
    assert r.tokens == expected_tokens(model, held_out, 64)
    r = evaluate_nll(model, None, data, max_length=64, max_examples=2, device="cpu")
    assert (r.examples, r.tokens) == (2, expected_tokens(model, ROWS[:2], 64))


def test_cli_evaluate_base_and_adapter(tiny_models, data, adapter, capsys):
    args = ["evaluate", "--model", str(tiny_models("llama")), "--dataset", data, "--max-length", "64"]
    assert main(args + ["--adapter", adapter, "--device", "cpu", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    base, trained = record["base"], record["trained"]
    assert base["tokens"] == trained["tokens"] > 0
    assert base["nats_per_token"] != pytest.approx(trained["nats_per_token"], rel=1e-4)
    assert main(args + ["--adapter", adapter, "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert f"{base['nats_per_token']:.4f}" in table and f"{trained['nats_per_token']:.4f}" in table
    assert "change" in table


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--dataset", "/nonexistent/data.jsonl"], "data.jsonl"),
        ([], "Pass --model and --dataset"),
        (["--dataset", "x.jsonl", "--eval-fraction", "1.5"], "between 0 and 1"),
        (["--dataset", "x.jsonl", "--no-base"], "nothing to score"),
    ],
)
def test_cli_evaluate_bad_input(tiny_models, extra, match, capsys):
    assert main(["evaluate", "--model", str(tiny_models("llama")), *extra]) == 2
    assert match in capsys.readouterr().err


def test_cli_evaluate_run_without_summary(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_evaluate_run_rejects_model_flags(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path), "--model", "m"]) == 2
    assert "drop --model" in capsys.readouterr().err


def test_adapter_dir_without_model_is_user_error(tiny_models, data, tmp_path):
    from evaluation.nll import evaluate_nll

    with pytest.raises(UserError, match="neither a peft adapter"):
        evaluate_nll(str(tiny_models("llama")), str(tmp_path), data, max_length=64, device="cpu")
