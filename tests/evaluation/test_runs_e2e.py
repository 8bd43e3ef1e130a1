"""Real trainer runs on a tiny model: evaluation reproduces the trainer's own numbers, and
`compare` reads the run directories the trainer writes."""

import json

import pytest

from flows.cli import main

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    from trainer.config import TrainConfig
    from trainer.loop import train

    root = tmp_path_factory.mktemp("runs")
    data = root / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"prompt": f"question {WORDS[i % 8]} answer:", "completion": f" {WORDS[(i * 5 + 3) % 8]}"}
            )
            + "\n"
            for i in range(40)
        )
    )
    common = dict(
        model=str(tiny_models("llama")),
        dataset=str(data),
        max_steps=6,
        batch_size=4,
        max_length=64,
        eval_points=3,
        eval_fraction=0.25,
        eval_max_examples=8,
        checkpoint_every=0,
    )
    lora = train(
        TrainConfig(method="lora", rank=4, lr=1e-2, output_dir=str(root / "lora"), **common), progress=False
    )
    full = train(TrainConfig(method="full", lr=1e-3, output_dir=str(root / "full"), **common), progress=False)
    return lora, full


@pytest.mark.parametrize("which", [0, 1])
def test_evaluate_run_reproduces_the_trainers_losses(runs, which):
    from evaluation.nll import evaluate_run

    result = runs[which]
    summary = json.loads(open(result.summary_path).read())
    curves = json.loads(open(result.curves_path).read())
    ev = evaluate_run(result.output_dir, device="cpu", batch_size=3)
    assert ev.method == result.method
    assert ev.trained.examples == summary["data"]["eval_examples"]
    assert ev.trained.tokens == summary["data"]["eval_completion_tokens"]
    assert ev.trained.nats_per_token == pytest.approx(result.final_eval_loss, rel=1e-5)
    assert ev.base.nats_per_token == pytest.approx(curves["eval"][0][1], rel=1e-5)  # step 0 = base model
    assert ev.trained.nats_per_token < ev.base.nats_per_token  # training helped on held-out data


def test_cli_evaluate_run_table(runs, capsys):
    lora, _ = runs
    assert main(["evaluate", "--run", lora.output_dir, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "held-out 25% (seed 0)" in out
    assert f"The trainer recorded a final eval loss of {lora.final_eval_loss:.4f}" in out
    assert out.count("\nlora    ") == 1 and out.count("\nbase    ") == 1


def test_compare_real_runs(runs, tmp_path, capsys):
    lora, full = runs
    curves = json.loads(open(lora.curves_path).read())
    chart = tmp_path / "c.png"
    assert (
        main(
            ["compare", "--lora", lora.output_dir, "--full", full.output_dir, "--json", "--chart", str(chart)]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert [p["step"] for p in record["matched"]] == [s for s, _ in curves["eval"] if s > 0]
    assert record["regret_nats"] == pytest.approx(lora.final_eval_loss - full.final_eval_loss)
    assert record["base_loss"] == pytest.approx(curves["eval"][0][1])
    assert chart.stat().st_size > 10_000
