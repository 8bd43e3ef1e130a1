"""`lowregret plan --dataset`: the planner on the data developer's DatasetProfile (planner/profile.py)."""

import json

import pytest

from flows.cli import main

pytest.importorskip("planner.profile")


def _plan_json(capsys, argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_builtin_facts_gives_exact_bits_and_a_verdict(capsys, tiny_models):
    plan = _plan_json(capsys, ["--model", str(tiny_models("llama")), "--rank", "1",
                               "--dataset", "builtin:facts?n_facts=500"])
    dataset, capacity = plan["dataset"], plan["capacity"]
    assert dataset["information_method"] == "exact" and dataset["examples"] == 500
    assert capacity["dataset_bits"] == dataset["information_bits"] > 0
    assert capacity["capacity_bits"] == pytest.approx(capacity["bits_per_param"] * plan["adapter_params"])
    assert capacity["verdict"] in ("low-regret", "borderline", "capacity-constrained")
    assert capacity["completion_tokens"] == dataset["completion_tokens"]
    assert plan["settings"]["steps"] == -(-500 // 32)


def test_small_jsonl(capsys, tmp_path, tiny_models):
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(20)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = _plan_json(capsys, ["--model", str(tiny_models("qwen3")), "--rank", "4", "--dataset", str(path),
                               "--info-method", "lzma"])
    assert plan["dataset"]["examples"] == 20
    assert plan["dataset"]["information_method"] == "lzma"
    assert plan["capacity"]["verdict"] == "low-regret"  # a few hundred bits against ~10^4 params


def test_catalog_model_offline_falls_back_to_smollm2_tokenizer(capsys):
    plan = _plan_json(capsys, ["--model", "meta-llama/Llama-3.1-8B", "--rank", "1",
                               "--dataset", "builtin:facts?n_facts=100"])
    assert any("SmolLM2 tokenizer" in note for note in plan["notes"])


def test_rl_episodes(capsys):
    # DESIGN.md: MATH, 10k problems × 32 samples ≈ 320k bits against a rank-1 Llama-3.1-8B LoRA.
    plan = _plan_json(capsys, ["--model", "Llama-3.1-8B", "--rank", "1", "--rl-episodes", "320000"])
    assert plan["capacity"]["dataset_bits"] == pytest.approx(320_000)
    assert plan["capacity"]["verdict"] == "low-regret"


@pytest.mark.parametrize("content", ["", "not json at all\n"])
def test_empty_or_unreadable_dataset_is_user_error(capsys, tmp_path, tiny_models, content):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    out = tmp_path / "out"
    assert main(["plan", "--model", str(tiny_models("llama")), "--rank", "1", "--dataset", str(path),
                 "--out", str(out)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists()


def test_missing_dataset_is_user_error(capsys, tmp_path, tiny_models):
    assert main(["plan", "--model", str(tiny_models("llama")), "--rank", "1",
                 "--dataset", str(tmp_path / "nope.jsonl")]) == 2
