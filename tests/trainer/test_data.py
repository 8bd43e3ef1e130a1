"""Data order, batch splitting and packing."""

import pytest
import torch

from data.dataset import IGNORE_INDEX as IGNORE
from tests.tiny import build_tokenizer, tiny_config
from trainer.data import Sequence, collate, micro_batches, pack, step_indices


def test_step_order_is_a_function_of_the_seed_and_covers_each_epoch():
    first = [step_indices(10, s, 5, seed=0) for s in range(4)]
    assert first == [step_indices(10, s, 5, seed=0) for s in range(4)]
    assert sorted(first[0] + first[1]) == list(range(10))  # epoch 0 = a permutation
    assert sorted(first[2] + first[3]) == list(range(10))
    assert first[:2] != [step_indices(10, s, 5, seed=1) for s in range(2)]
    assert first[0] + first[1] != first[2] + first[3]  # reshuffled each epoch


def test_two_processes_see_what_one_process_with_twice_the_accumulation_sees():
    indices = step_indices(100, 3, 2 * 4 * 2, seed=0)  # batch 4, 2 x (accum, processes)
    one = micro_batches(indices, 4, num_processes=1, process_index=0)
    two = [micro_batches(indices, 4, num_processes=2, process_index=p) for p in (0, 1)]
    assert len(one) == 4 and all(len(p) == 2 for p in two)
    assert sorted(map(tuple, one)) == sorted(map(tuple, two[0] + two[1]))


def _segment_lengths(row):
    starts = [i for i, p in enumerate(row.position_ids) if p == 0]
    return [b - a for a, b in zip(starts, starts[1:] + [len(row.position_ids)], strict=True)]


def test_pack_keeps_whole_examples_within_max_length():
    lengths = (5, 3, 7, 2, 6)
    seqs = [Sequence(list(range(n)), [IGNORE] * n, list(range(n))) for n in lengths]
    rows = pack(seqs, max_length=10, seed=0)
    assert all(len(r.input_ids) <= 10 for r in rows)
    assert sorted(n for r in rows for n in _segment_lengths(r)) == sorted(lengths)
    assert len(rows) < len(seqs)


def test_packed_row_gives_each_example_its_own_logits_and_loss():
    from transformers import AutoModelForCausalLM

    from trainer.loss import completion_nll, loss_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(build_tokenizer()))).eval()
    a = Sequence([5, 9, 13, 17, 21], [9, 13, IGNORE, 21, IGNORE], list(range(5)))
    b = Sequence([30, 31, 32], [31, 32, IGNORE], list(range(3)))
    (row,) = pack([a, b], max_length=16, seed=0)
    batch = collate([row, a], pad_id=0, packed=True)  # row 2: a, then a padding tail
    with torch.no_grad():
        logits = model(**batch.inputs, use_cache=False).logits
        alone = {s.input_ids[0]: model(input_ids=torch.tensor([s.input_ids])).logits[0] for s in (a, b)}
        start = 0
        for n in _segment_lengths(row):
            torch.testing.assert_close(logits[0, start : start + n], alone[row.input_ids[start]], atol=1e-5, rtol=0)
            start += n
        torch.testing.assert_close(logits[1, :5], alone[5], atol=1e-5, rtol=0)
        # The loop's loss on the packed batch = the losses of the examples alone (a counted twice).
        head, _ = loss_head(model)
        packed_loss = completion_nll(model, batch, head=head).nll_sum
        single = [completion_nll(model, collate([s], 0, packed=False), head=head).nll_sum for s in (a, b, a)]
    torch.testing.assert_close(packed_loss, sum(single), atol=1e-4, rtol=0)


def test_unpacked_collate_masks_padding():
    a = Sequence([5, 6, 7], [6, 7, IGNORE], [0, 1, 2])
    b = Sequence([8], [IGNORE], [0])
    batch = collate([a, b], pad_id=0, packed=False)
    assert batch.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.inputs["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.targets_B_T.tolist() == [[6, 7, IGNORE], [IGNORE] * 3]
    assert batch.loss_positions_N.tolist() == [0, 1]  # flat row·width + t of the targets that count


def test_lora_and_full_get_the_same_examples_in_the_same_order(tmp_path):
    from tests.trainer.conftest import write_rows
    from trainer.config import TrainConfig
    from trainer.data import prepare_data

    rows = write_rows(tmp_path / "rows.jsonl")
    tokenizer = build_tokenizer()
    lora = prepare_data(TrainConfig(dataset=str(rows), method="lora", max_length=64), tokenizer)
    full = prepare_data(TrainConfig(dataset=str(rows), method="full", max_length=64), tokenizer)
    assert lora.train == full.train and lora.eval == full.eval and lora.fingerprint == full.fingerprint
    reseeded = prepare_data(TrainConfig(dataset=str(rows), seed=1, max_length=64), tokenizer)
    assert reseeded.eval != lora.eval  # the held-out split follows the seed


def test_eval_dataset_replaces_the_split_and_truncation_is_counted(tmp_path):
    from tests.trainer.conftest import write_rows
    from trainer.config import TrainConfig
    from trainer.data import prepare_data

    rows, held_out = write_rows(tmp_path / "rows.jsonl", n=20), write_rows(tmp_path / "eval.jsonl", n=6)
    tokenizer = build_tokenizer()
    data = prepare_data(TrainConfig(dataset=str(rows), eval_dataset=str(held_out), max_length=64), tokenizer)
    assert (len(data.train), len(data.eval)) == (20, 6)
    assert data.stats["train_truncated"] == 0
    import json

    prompts = [json.loads(line)["prompt"] for line in open(rows)]
    prompt_tokens = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    short = prepare_data(TrainConfig(dataset=str(rows), max_length=prompt_tokens + 1), tokenizer)
    assert 0 < short.stats["train_truncated"] <= len(short.train)
    assert all(len(s.input_ids) <= prompt_tokens + 1 for s in short.train)


def test_every_row_is_accounted_for_in_the_stats_and_the_data_line(tmp_path):
    from tests.trainer.conftest import write_rows
    from trainer.config import TrainConfig
    from trainer.data import describe_data, prepare_data

    rows = write_rows(tmp_path / "rows.jsonl", n=200)
    config = TrainConfig(dataset=str(rows), max_length=64, eval_max_examples=16)
    data = prepare_data(config, build_tokenizer())
    s = data.stats
    assert (s["rows"], s["train_rows"], s["held_out_rows"], s["held_out_unscored"]) == (200, 180, 20, 4)
    assert s["train_rows"] + s["held_out_rows"] == s["rows"]
    assert (s["train_examples"], s["eval_examples"]) == (180 - s["dropped_train"], 16 - s["dropped_eval"])
    assert describe_data(data, config) == (
        "data: 200 rows of prompt_completion (prompt/completion, the completion trained) = 180 train + "
        "20 held-out (16 scored, 4 beyond eval_max_examples=16); 0 dropped (no completion token within "
        "max_length=64), 0 truncated to 64 tokens"
    )


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "text"])
def test_each_format_trains_the_right_tokens(tmp_path, fmt):
    """The trainer reads every format: targets (labels shifted by one) cover only what is trained."""
    import json

    from trainer.config import TrainConfig
    from trainer.data import prepare_data

    def row(i):
        if fmt == "alpaca":
            return {"instruction": f"Name item {i}.", "input": "", "output": f"item {i}"}
        if fmt == "sharegpt":
            return {"conversations": [{"from": "human", "value": f"Name item {i}."}, {"from": "gpt", "value": f"item {i}"}]}
        return {"text": f"Item {i} is the item numbered {i}."}

    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(row(i)) + "\n" for i in range(10)))
    tokenizer = build_tokenizer()
    data = prepare_data(TrainConfig(dataset=str(path), max_length=64), tokenizer)
    assert data.format == fmt and len(data.train) + len(data.eval) == 10
    for seq in data.train + data.eval:
        trained = tokenizer.decode([t for t in seq.targets if t != IGNORE])
        if fmt == "text":  # every token but the first is a target: the first has no context
            assert seq.targets[:-1] == seq.input_ids[1:] and trained.endswith("<|im_end|>")
        else:
            assert trained.startswith("item ") and trained.endswith("<|im_end|>") and "Name" not in trained


def test_evaluation_scores_the_same_held_out_examples_in_every_format(tmp_path):
    import json

    from evaluation.nll import HeldOutSpec, held_out_examples
    from trainer.config import TrainConfig
    from trainer.data import prepare_data, to_sequence

    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} said"}) + "\n" for i in range(20)))
    tokenizer = build_tokenizer()
    data = prepare_data(TrainConfig(dataset=str(path), max_length=64, eval_fraction=0.2), tokenizer)
    spec = HeldOutSpec("unused", str(path), 0.2, 0, 64)
    assert [to_sequence(e) for e in held_out_examples(spec, tokenizer)] == data.eval


def test_check_data_checks_exactly_the_rows_a_run_uses(tmp_path):
    """The pipeline's input check fails on a prompt that fills max_length only if the run would use it."""
    from data.errors import UserError
    from tests.trainer.conftest import write_rows
    from trainer.config import TrainConfig
    from trainer.data import check_data

    rows = write_rows(tmp_path / "rows.jsonl", n=20)
    held_out = tmp_path / "eval.jsonl"
    lines = open(write_rows(held_out, n=6)).read().splitlines()
    lines[5] = lines[5].replace("question", "question " + "word " * 80)
    held_out.write_text("\n".join(lines) + "\n")
    tokenizer = build_tokenizer()
    base = dict(dataset=str(rows), eval_dataset=str(held_out), max_length=64)
    assert check_data(TrainConfig(**base, eval_max_examples=5), tokenizer).data.rows == 20  # row 5 is never scored
    with pytest.raises(UserError, match="Row 5: the prompt alone is"):
        check_data(TrainConfig(**base, eval_max_examples=None), tokenizer)
