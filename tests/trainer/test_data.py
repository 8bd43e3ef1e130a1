"""Data order, batch splitting and packing."""

import torch

from planner.dataset import IGNORE_INDEX as IGNORE
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
