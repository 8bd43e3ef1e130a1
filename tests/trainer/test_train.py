"""The loop on a tiny model: loss falls, results reload exactly, bad input fails before any step."""

import json
from pathlib import Path

import pytest

from data.errors import UserError
from tests.trainer.conftest import write_rows
from trainer.loop import train


def _heldout_loss(model, config):
    """Held-out loss of `model` on the run's held-out examples, computed as the loop does."""
    from accelerate import Accelerator

    from data.sources import load_tokenizer
    from trainer.data import prepare_data
    from trainer.loop import _evaluate
    from trainer.loss import loss_head

    data = prepare_data(config, load_tokenizer(config.model))
    return _evaluate(model, data.eval, config.batch_size, 0, Accelerator(cpu=True), loss_head(model)[0]).loss


@pytest.mark.parametrize("method, lr", [("lora", 1e-2), ("full", 1e-3)])
def test_loss_falls_and_the_saved_result_reloads_exactly(tiny_config, method, lr):
    from trainer.model import load_trained

    config = tiny_config(method=method, lr=lr)
    result = train(config, progress=False)

    curves = json.loads(open(result.curves_path).read())
    assert [s for s, _ in curves["train"]] == list(range(1, config.max_steps + 1))
    assert [s for s, _ in curves["eval"]][0] == 0 and curves["eval"][-1][0] == config.max_steps
    base_loss, final_loss = curves["eval"][0][1], curves["eval"][-1][1]
    assert final_loss < base_loss - 0.05, curves["eval"]
    assert result.final_eval_loss == final_loss and result.steps == config.max_steps

    model, _ = load_trained(result.output_dir)
    assert _heldout_loss(model, config) == pytest.approx(final_loss, abs=1e-5)

    summary = json.loads(open(result.summary_path).read())
    assert summary["config"]["method"] == method and summary["trainable_params"] == result.trainable_params
    # Per-example held-out losses: they add up to the eval curve at every eval step.
    examples = json.loads(Path(result.scores_path).read_text())
    assert (examples["objective"], examples["score"]) == ("supervised", "nll")
    assert len(examples["ids"]) == summary["data"]["eval_examples"]
    assert sum(examples["weights"]) == summary["data"]["eval_completion_tokens"]
    assert [step for step, _ in examples["by_step"]] == [step for step, _ in curves["eval"]]
    for (_, nll), (_, loss) in zip(examples["by_step"], curves["eval"], strict=True):
        assert sum(nll) / sum(examples["weights"]) == pytest.approx(loss, rel=1e-9)
    assert summary["data_fingerprint"] and summary["heldout_fingerprint"]
    assert result.tokens > 0 and result.tokens_per_s > 0 and result.peak_memory_bytes > 0
    if method == "lora":
        assert result.trainable_params == 8192
        files = {p.name for p in Path(result.model_dir).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files


def test_adapter_loads_with_peft_and_holds_only_lora_weights(tiny_config, tiny_models):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result = train(tiny_config(max_steps=3), progress=False)
    adapter_config = json.loads(open(f"{result.model_dir}/adapter_config.json").read())
    assert adapter_config["base_model_name_or_path"] == str(tiny_models("llama"))
    assert not adapter_config.get("modules_to_save")
    tensors = load_file(f"{result.model_dir}/adapter_model.safetensors")
    assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models("llama")), result.model_dir)
    assert _heldout_loss(model, tiny_config(max_steps=3)) == pytest.approx(result.final_eval_loss, abs=1e-5)


def test_trainresult_round_trips(tiny_config):
    from trainer.result import TrainResult

    result = train(tiny_config(max_steps=2, eval_points=2), progress=False)
    assert TrainResult.from_dict(result.to_dict()) == result
    assert TrainResult.from_dict(json.loads(open(result.summary_path).read())) == result


def _never_step(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a forward pass ran before the bad input was reported")

    monkeypatch.setattr("trainer.loop.train_micro_batch", fail)
    monkeypatch.setattr("trainer.loop.completion_nll", fail)


@pytest.mark.parametrize(
    "case, overrides, message",
    [
        ("missing columns", {}, "column"),
        ("empty dataset", {}, "no rows|no examples"),
        ("prompt too long", {"max_length": 16}, "max_length"),
        ("unknown target", {"targets": "q_proj,nope_proj"}, "Unknown LoRA target"),
        ("bad rank", {"rank": 40}, "rank 40 is larger"),
    ],
)
def test_bad_input_fails_before_any_step_and_writes_nothing(tiny_config, tmp_path, monkeypatch, case, overrides,
                                                           message):
    _never_step(monkeypatch)
    data = tmp_path / "bad.jsonl"
    if case == "missing columns":
        data.write_text('{"question": "a"}\n{"question": "b"}\n{"question": "c"}\n')
    elif case == "empty dataset":
        data.write_text("")
    elif case == "prompt too long":
        write_rows(data, prompt_words=20)
    else:
        write_rows(data)
    config = tiny_config(dataset=str(data), **overrides)
    with pytest.raises(UserError, match=message):
        train(config, progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_finished_run_is_not_overwritten_unless_asked(tiny_config, tmp_path, monkeypatch):
    first = train(tiny_config(max_steps=2, eval_points=2), progress=False)
    before = open(first.summary_path).read()
    with monkeypatch.context() as patch:
        _never_step(patch)
        with pytest.raises(UserError, match="already exists"):
            train(tiny_config(max_steps=3, eval_points=2), progress=False)
    assert open(first.summary_path).read() == before
    second = train(tiny_config(max_steps=3, eval_points=2, overwrite=True), progress=False)
    assert second.steps == 3 and json.loads(open(second.summary_path).read())["steps"] == 3


def test_resume_from_another_config_is_refused_and_touches_nothing(tiny_config, tmp_path, monkeypatch):
    source = train(tiny_config(max_steps=4, checkpoint_every=2, eval_points=2), progress=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    assert (checkpoint / "state.json").is_file()
    snapshot = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    _never_step(monkeypatch)
    other = tiny_config(rank=8, resume=source.output_dir, output_dir=str(tmp_path / "other"))
    with pytest.raises(UserError, match="another configuration"):
        train(other, progress=False)
    assert snapshot == {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.partial").exists()


def test_gradient_checkpointing_and_clipping_keep_the_losses(tiny_config, tmp_path):
    plain = train(tiny_config(max_steps=3, eval_points=2, output_dir=str(tmp_path / "a")), progress=False)
    recomputed = train(tiny_config(max_steps=3, eval_points=2, output_dir=str(tmp_path / "b"),
                                   gradient_checkpointing=True, max_grad_norm=1e6), progress=False)
    want = json.loads(open(plain.curves_path).read())
    got = json.loads(open(recomputed.curves_path).read())
    assert want["train"][-1][1] != want["train"][0][1]  # the steps did change the model
    for kind in ("train", "eval"):
        assert [loss for _, loss in got[kind]] == pytest.approx([loss for _, loss in want[kind]], abs=1e-5)


@pytest.mark.parametrize("method, lr", [("lora", 1e-2), ("full", 1e-3)])
def test_chunked_loss_trains_exactly_like_full_logits(tiny_config, tmp_path, monkeypatch, method, lr):
    """The loop's chunked completion loss gives the full-logits path's curves (tied embeddings: the
    head's weight is the input embedding, trained by FullFT)."""
    chunked = train(tiny_config(method=method, lr=lr, max_steps=3, eval_points=2,
                                output_dir=str(tmp_path / "chunked")), progress=False)
    monkeypatch.setattr("trainer.loop.loss_head", lambda model, sharded: (None, "forced by the test"))
    full = train(tiny_config(method=method, lr=lr, max_steps=3, eval_points=2,
                             output_dir=str(tmp_path / "full")), progress=False)
    summaries = [json.loads(open(r.summary_path).read()) for r in (chunked, full)]
    assert [s["loss_path"] for s in summaries] == ["chunked", "full logits: forced by the test"]
    want, got = (json.loads(open(r.curves_path).read()) for r in (full, chunked))
    for kind in ("train", "eval"):
        assert [loss for _, loss in got[kind]] == pytest.approx([loss for _, loss in want[kind]], abs=1e-5)
    assert want["eval"][-1][1] < want["eval"][0][1]


def test_packed_run_trains_on_fewer_rows(tiny_config):
    result = train(tiny_config(max_steps=2, eval_points=2, packing=True), progress=False)
    data = json.loads(open(result.summary_path).read())["data"]
    assert 0 < data["packed_rows"] < data["train_examples"]
    assert result.final_train_loss > 0


def test_moe_adapter_with_expert_ranks_reloads_exactly(tiny_config):
    from trainer.model import load_trained

    result = train(tiny_config(arch="qwen3_moe", max_steps=2, eval_points=2), progress=False)
    adapter_config = json.loads(open(f"{result.model_dir}/adapter_config.json").read())
    assert adapter_config["target_parameters"] and set(adapter_config["rank_pattern"].values()) == {2}
    model, _ = load_trained(result.output_dir)
    assert _heldout_loss(model, tiny_config(arch="qwen3_moe")) == pytest.approx(result.final_eval_loss, abs=1e-5)


def test_unfinished_run_is_not_discarded_without_resume_or_overwrite(tiny_config, tmp_path, monkeypatch):
    train(tiny_config(max_steps=4, checkpoint_every=2, eval_points=2), progress=False)
    (tmp_path / "run").rename(tmp_path / "run.partial")  # looks like a killed run with a checkpoint
    _never_step(monkeypatch)
    with pytest.raises(UserError, match="unfinished run.*resume=auto"):
        train(tiny_config(max_steps=4, checkpoint_every=2, eval_points=2), progress=False)
    assert (tmp_path / "run.partial" / "checkpoints" / "step-2" / "state.json").is_file()
