"""Adapters written by `trainer.train` on a tiny MoE model, served beside each other.

The trainer's default targets on an MoE model include the experts' 3-D weights (peft
`target_parameters`), and peft refuses `adapter_names` on such a model ("lora.ParamWrapper does
not support mixed adapter batches yet", peft 0.21). The server then runs one generate call per
adapter instead of failing; once that adapter is removed, batches mix again.
"""

from __future__ import annotations

import json
import threading

import pytest

from tests.serve.conftest import ADMIN, PROMPT, Client, one_torch_thread, start

N_TOKENS = 8


@pytest.fixture(scope="module")
def moe_runs(tiny_models, tmp_path_factory):
    """Two trainer runs on tiny qwen3_moe: experts + attention ("all"), and attention only."""
    from trainer import train
    from trainer.config import TrainConfig

    root = tmp_path_factory.mktemp("moe-runs")
    base = tiny_models("qwen3_moe")
    runs = {}
    with one_torch_thread():
        for name, targets, completion in [
            ("experts", "all", " Paris. The capital of France is Paris."),
            ("attn", "attention", " json dumps sorted zip map open."),
        ]:
            rows = root / f"{name}.jsonl"
            rows.write_text(
                "".join(json.dumps({"prompt": PROMPT, "completion": completion}) + "\n" for _ in range(16))
            )
            config = TrainConfig(
                model=str(base), dataset=str(rows), method="lora", rank=4, lr=2e-2, max_steps=12, batch_size=4,
                max_length=64, eval_points=2, eval_max_examples=2, checkpoint_every=0, targets=targets,
                output_dir=str(root / name),
            )  # fmt: skip
            runs[name] = train(config, progress=False).model_dir
    return base, runs


@pytest.fixture(scope="module")
def moe_expected(moe_runs):
    """Greedy answers from trainer.model.load_trained (and the bare base), outside the server."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.model import load_trained

    base, runs = moe_runs
    texts = {}
    with one_torch_thread(), torch.inference_mode():
        models = {name: load_trained(path) for name, path in runs.items()}
        tokenizer = next(iter(models.values()))[1]
        models["moe-base"] = (AutoModelForCausalLM.from_pretrained(base).eval(), tokenizer)
        ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
        for name, (model, tok) in models.items():
            out = model.generate(
                input_ids=ids, max_new_tokens=N_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
            )
            texts[name] = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return texts


def _ask_together(client, models):
    results, barrier = {}, threading.Barrier(len(models))

    def ask(i, model):
        barrier.wait()
        status, body = client.complete(model, max_tokens=N_TOKENS, temperature=0)
        results[i] = body["choices"][0]["text"] if status == 200 else (status, body)

    threads = [threading.Thread(target=ask, args=(i, m)) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return [results.get(i) for i in range(len(models))]


def test_trainer_moe_adapters_serve_correctly_with_and_without_mixing(moe_runs, moe_expected):
    base, runs = moe_runs
    assert len(set(moe_expected.values())) == 3, f"the trained adapters must differ: {moe_expected}"
    running = start(base, runs)
    running.engine.base_name = "moe-base"
    try:
        client, engine = Client(running.url), running.engine
        assert not engine.pool.resident_mixable()
        models = ["experts", "attn", "moe-base"] * 2
        assert _ask_together(client, models) == [moe_expected[m] for m in models]
        assert engine.stats.mixed_batches == 0  # one generate call per adapter while experts are loaded

        assert client.call("DELETE", "/v1/adapters/experts", headers=ADMIN)[0] == 200
        assert engine.pool.resident_mixable()
        models = ["attn", "moe-base"] * 2
        assert _ask_together(client, models) == [moe_expected[m] for m in models]
        assert engine.stats.mixed_batches > 0
    finally:
        running.stop()


def test_export_takes_the_attention_adapter_and_refuses_the_expert_one(moe_runs, tmp_path):
    from data.errors import UserError
    from serving.export import export_vllm

    base, runs = moe_runs
    result = export_vllm(runs["attn"], tmp_path / "attn")
    assert result.name == "attn" and result.base == str(base) and result.max_lora_rank == 8
    with pytest.raises(UserError, match="target_parameters"):
        export_vllm(runs["experts"], tmp_path / "experts")
    assert not (tmp_path / "experts").exists()
