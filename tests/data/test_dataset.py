"""data.dataset: loading every source type, format checks, label masks, fingerprint."""

import csv
import json

import pytest

from data.dataset import (
    IGNORE_INDEX,
    dataset_fingerprint,
    detect_format,
    load_rows,
)
from data.errors import UserError
from data.render import Renderer, prompt_length
from tests.tiny import build_tokenizer

CHAT = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]
PC = [{"prompt": "The capital of France is", "completion": " Paris."}, {"prompt": "a", "completion": " b"}]


def _trained_runs(tokenizer, example) -> list[str]:
    """Decoded text of each maximal run of trained (label != -100) tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # labels are the ids themselves, unshifted
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# --- load_rows ---------------------------------------------------------------------------------


def _write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "json-lines":  # what datasets' to_json writes under a .json name
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif kind == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize(
    "kind,suffix",
    [
        ("jsonl", ".jsonl"),
        ("json", ".json"),
        ("json-lines", ".json"),
        ("csv", ".csv"),
        ("parquet", ".parquet"),
    ],
)
@pytest.mark.parametrize("rows", [CHAT, PC], ids=["chat", "prompt_completion"])
def test_load_each_file_type_round_trips(tmp_path, kind, suffix, rows):
    path = tmp_path / f"data{suffix}"
    _write(path, rows, kind)
    assert load_rows(str(path)) == rows
    assert load_rows(str(path), limit=1) == rows[:1]


@pytest.mark.parametrize("as_dict", [False, True], ids=["Dataset", "DatasetDict"])
def test_load_save_to_disk_directory(tmp_path, as_dict):
    import datasets

    ds = datasets.Dataset.from_list(PC)
    if as_dict:
        ds = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_rows(str(tmp_path / "saved")) == PC
    assert load_rows(str(tmp_path / "saved"), limit=1) == PC[:1]


def test_save_to_disk_without_train_split(tmp_path):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(PC)}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(UserError, match="no `train` split"):
        load_rows(str(tmp_path / "d"))


def test_hub_id_offline_is_user_error():
    # conftest sets HF_DATASETS_OFFLINE=1: the id cannot be reached, and the message says what to do.
    with pytest.raises(UserError, match=r"could not be reached.*local \.jsonl"):
        load_rows("no-such-org/no-such-dataset:train")


@pytest.mark.parametrize(
    "source,match",
    [
        ("missing.jsonl", "not found"),
        ("./missing", "not found"),
        ("just words", "Cannot tell"),
        ("builtin:nope", "builtin:facts, builtin:numpydoc, builtin:pydoc"),
        ("builtin:facts?bogus=1", "n_facts .*choices .*seed"),
        ("builtin:facts?n_facts=x", "non-negative integer"),
        ("builtin:facts?seed=1&seed=2", "twice"),
        ("builtin:facts?choices=1", "choices"),
        ("builtin:pydoc?limit=0", "limit >= 1"),
    ],
)
def test_bad_sources_are_user_errors(source, match):
    with pytest.raises(UserError, match=match):
        load_rows(source)


def test_bad_files_are_user_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{not json}\n')
    with pytest.raises(UserError, match="line 2"):
        load_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(UserError, match="JSON object"):
        load_rows(str(tmp_path / "list.jsonl"))
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(UserError, match="list of objects"):
        load_rows(str(tmp_path / "scalar.json"))
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(UserError, match="Unsupported dataset file type"):
        load_rows(str(tmp_path / "data.txt"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="Parquet"):
        load_rows(str(tmp_path / "bad.parquet"))
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(UserError, match="save_to_disk"):
        load_rows(str(tmp_path / "plain_dir"))
    with pytest.raises(UserError, match="limit"):
        load_rows(str(tmp_path / "bad.jsonl"), limit=0)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_non_utf8_text_is_a_user_error(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes('{"prompt": "caf\xe9", "completion": "ol\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_rows(str(path))


def test_builtin_via_load_rows_honours_both_limits():
    assert len(load_rows("builtin:facts?n_facts=10&choices=4")) == 10
    assert len(load_rows("builtin:facts?n_facts=10&choices=4", limit=3)) == 3
    assert len(load_rows("builtin:pydoc?limit=5")) == 5


# --- detect_format -----------------------------------------------------------------------------


def test_detect_format_both_forms():
    assert detect_format(CHAT) == "chat"
    assert detect_format(PC) == "prompt_completion"


@pytest.mark.parametrize(
    "rows,match",
    [
        ([], "no examples"),
        ([{"question": "x"}], r"columns \['question'\], which match no accepted format"),
        ([{"prompt": "a"}], r"prompt_completion: \{\"prompt\""),
        ([{"prompt": "a", "completion": "b", "messages": []}], "columns of two formats"),
        ([PC[0], {"prompt": "a", "completion": 3}], r"row 1: `completion` must be a string"),
        ([{"prompt": "a", "completion": ""}], "row 0: the completion is empty"),
        ([CHAT[0], {"messages": "hi"}], "row 1: `messages` must be a non-empty list"),
        ([{"messages": [{"role": "user"}]}], r"row 0, message 0: expected"),
        ([CHAT[0], {"messages": [{"role": "user", "content": "hi"}]}], "row 1: no assistant turn"),
        (["plain string"], "row 0: expected an object"),
    ],
)
def test_detect_format_rejects_bad_rows(rows, match):
    with pytest.raises(UserError, match=match):
        detect_format(rows)


def test_detect_format_names_the_source():
    with pytest.raises(UserError, match="'data.jsonl', row 0"):
        detect_format([{"prompt": "a", "completion": None}], source="data.jsonl")


# --- Renderer.example --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_chat_mask_is_exactly_the_assistant_turn_and_end_token(tok):
    ex = Renderer(tok).example(CHAT[0], "chat", 512)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    assert _trained_runs(tok, ex) == ["hello there<|im_end|>"]
    assert len(ex.labels) == len(ex.input_ids) and not ex.truncated
    # The trained run sits right after the generation prompt: nothing of the prompt is trained.
    prompt = tok.apply_chat_template(CHAT[0]["messages"][:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert set(ex.labels[:n_prompt]) == {IGNORE_INDEX}
    assert ex.labels[n_prompt] != IGNORE_INDEX


def test_multi_turn_chat_trains_every_assistant_turn_only(tok):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "and now?"},
            {"role": "assistant", "content": "the answer is json"},
        ]
    }
    ex = Renderer(tok).example(row, "chat", 512)
    assert _trained_runs(tok, ex) == ["hello there<|im_end|>", "the answer is json<|im_end|>"]
    # The "\n" after each <|im_end|> and the next turn's header are not trained.
    assert ex.labels[-1] == IGNORE_INDEX and tok.decode(ex.input_ids[-1:]) == "\n"


def test_conversation_opening_with_the_assistant_trains_only_its_turn(tok):
    row = {
        "messages": [{"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "hi"}]
    }
    ex = Renderer(tok).example(row, "chat", 512)
    assert _trained_runs(tok, ex) == ["How can I help?<|im_end|>"]
    first = next(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX)
    assert tok.decode(ex.input_ids[:first]) == "<|im_start|>assistant\n"
    empty_opening = {"messages": [{"role": "assistant", "content": ""}, *CHAT[0]["messages"]]}
    assert _trained_runs(tok, Renderer(tok).example(empty_opening, "chat", 512)) == ["hello there<|im_end|>"]


def test_prompt_completion_trains_completion_and_eos(tok):
    ex = Renderer(tok).example(PC[0], "prompt_completion", 512)
    prompt_ids = tok(PC[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    assert ex.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert _trained_runs(tok, ex) == [" Paris.<|im_end|>"]
    assert ex.input_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("fmt,row", [("chat", CHAT[0]), ("prompt_completion", PC[0])])
def test_truncation_keeps_the_first_tokens_and_flags_it(tok, fmt, row):
    full = Renderer(tok).example(row, fmt, 10_000)
    cut = Renderer(tok).example(row, fmt, len(full.input_ids) - 2)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:-2] and cut.labels == full.labels[:-2]
    exact = Renderer(tok).example(row, fmt, len(full.input_ids))
    assert not exact.truncated and exact == full


@pytest.mark.parametrize("fmt,row", [("chat", CHAT[0]), ("prompt_completion", PC[0])])
def test_prompt_filling_max_length_is_user_error(tok, fmt, row):
    full = Renderer(tok).example(row, fmt, 10_000)
    n_prompt = full.labels.index(next(label for label in full.labels if label != IGNORE_INDEX))
    # One completion token fits: fine. None fits: error naming the row and the fix.
    assert Renderer(tok).example(row, fmt, n_prompt + 1).labels[-1] != IGNORE_INDEX
    with pytest.raises(UserError, match=rf"Row 7: the prompt alone is {n_prompt} tokens.*Raise max_length"):
        Renderer(tok).example(row, fmt, n_prompt, row_index=7)


def test_tokenizer_without_chat_template_is_user_error(tok):
    bare = build_tokenizer.__wrapped__()  # a fresh copy: the cached one is shared
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template.*prompt/completion"):
        Renderer(bare).example(CHAT[0], "chat", 512)
    assert Renderer(bare).example(PC[0], "prompt_completion", 512).input_ids  # still fine


def test_a_generation_prompt_is_the_prompt_of_the_training_example(tok):
    """One renderer: what RL, the pyfunc model and the server generate from is exactly the untrained
    head of the training example of the same turns (chat and raw text)."""
    renderer = Renderer(tok)
    multi = {"messages": [*CHAT[0]["messages"], {"role": "user", "content": "and 2+2?"},
                          {"role": "assistant", "content": "4"}]}
    for row in (CHAT[0], multi):
        example = renderer.example(row, "chat", 512)
        prompt = renderer.prompt(row["messages"][:-1])
        assert example.input_ids[:len(prompt)] == prompt
        assert example.labels[len(prompt)] != IGNORE_INDEX and example.labels[len(prompt) - 1] == IGNORE_INDEX
    pc = renderer.example(PC[0], "prompt_completion", 512)
    assert pc.input_ids[:prompt_length(pc.labels)] == renderer.prompt(PC[0]["prompt"])
    assert tok.eos_token_id in renderer.stop_ids() and renderer.pad_id is not None
    bare = build_tokenizer.__wrapped__()
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        Renderer(bare).prompt(CHAT[0]["messages"][:1])


def test_template_that_rewrites_history_is_user_error(tok):
    # A template that renders only the last message breaks the prefix property.
    odd = build_tokenizer.__wrapped__()
    odd.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(UserError, match="renders the conversation up to assistant message 1 differently"):
        Renderer(odd).example(CHAT[0], "chat", 512)


PLAIN_TEMPLATE = (  # no special tokens at all: nothing closes a turn
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def test_template_without_end_token_trains_the_content_only():
    plain = build_tokenizer.__wrapped__()
    plain.chat_template = PLAIN_TEMPLATE
    ex = Renderer(plain).example(CHAT[0], "chat", 512)
    assert plain.decode(ex.input_ids) == "user: hi\nassistant: hello there\n"
    assert _trained_runs(plain, ex) == ["hello there"]
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    with pytest.raises(UserError, match="Row 3: the assistant turns are empty"):
        Renderer(plain).example(empty, "chat", 512, row_index=3)


def test_bad_max_length_and_bad_row(tok):
    with pytest.raises(UserError, match="max_length"):
        Renderer(tok).example(PC[0], "prompt_completion", 0)
    with pytest.raises(UserError, match="no assistant turn"):
        Renderer(tok).example({"messages": [{"role": "user", "content": "x"}]}, "chat", 512)


# --- fingerprint ----------------------------------------------------------------------------


def test_fingerprint_is_stable_and_content_sensitive():
    fp = dataset_fingerprint(PC)
    assert len(fp) == 16 and int(fp, 16) >= 0
    # Key order does not matter; content and row order do.
    assert dataset_fingerprint([{"completion": r["completion"], "prompt": r["prompt"]} for r in PC]) == fp
    assert dataset_fingerprint(PC[::-1]) != fp
    assert dataset_fingerprint([PC[0], {**PC[1], "completion": " c"}]) != fp
    # Pinned value: sha256 of the canonical JSON, computed independently here.
    import hashlib

    canonical = (
        '[{"completion":" Paris.","prompt":"The capital of France is"},{"completion":" b","prompt":"a"}]'
    )
    assert fp == hashlib.sha256(canonical.encode()).hexdigest()[:16]


# --- Alpaca, ShareGPT and text ------------------------------------------------------------------

ALPACA = [
    {"instruction": "Name the capital.", "input": "France", "output": "Paris"},
    {"instruction": "Say hi.", "input": "", "output": "hello there", "text": "### pre-rendered, ignored"},
]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "hello there"}, {"from": "human", "value": "and now?"},
                               {"from": "gpt", "value": "the answer is json"}]}]
TEXT = [{"text": "The capital of France is Paris."}, {"text": "json dumps a value."}]


@pytest.mark.parametrize("rows,fmt", [(CHAT, "chat"), (PC, "prompt_completion"), (ALPACA, "alpaca"),
                                      (SHAREGPT, "sharegpt"), (TEXT, "text")])
def test_detect_format_each_format(rows, fmt):
    assert detect_format(rows) == fmt


def test_unknown_columns_list_every_format_and_suggest_the_mapping_the_names_make_likely():
    with pytest.raises(UserError) as error:
        detect_format([{"question": "q", "answer": "a"}], source="qa.jsonl")
    message = str(error.value)
    assert message.startswith("Dataset 'qa.jsonl' has columns ['answer', 'question'], which match no accepted format")
    for fmt in ("chat", "prompt_completion", "alpaca", "sharegpt", "text"):
        assert f"\n  {fmt}: {{" in message, fmt
    assert "`columns: {prompt: question, completion: answer}`" in message
    assert "`columns.prompt=question columns.completion=answer`" in message
    assert "`--column prompt=question --column completion=answer`" in message


def test_a_code_set_as_it_ships_gets_the_mapping_its_names_suggest():
    """HumanEval's columns (openai/human-eval's HumanEval.jsonl): the refusal once suggested
    {prompt: .task_id, completion: .prompt}; the names say completion <- canonical_solution."""
    row = {"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
           "test": "assert f() == 1", "entry_point": "f"}
    with pytest.raises(UserError) as error:
        detect_format([row], source="HumanEval.jsonl")
    message = str(error.value)
    assert "`columns: {completion: canonical_solution}`" in message and "task_id" not in message.split("format.")[-1]


def test_names_that_suggest_nothing_get_the_mapping_syntax_not_a_guess():
    with pytest.raises(UserError) as error:
        detect_format([{"a": "x", "b": "y"}], source="ab.jsonl")
    message = str(error.value)
    assert "suggest" not in message and "columns: {prompt: <your prompt column>, completion: <your answer column>}" in message


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"instruction": "a", "output": 3}], r"row 0: `output` must be a string.*format alpaca looks like"),
        ([{"instruction": "a", "input": 1, "output": "b"}], r"row 0: `input` must be a string"),
        ([ALPACA[0], {"instruction": "a", "output": ""}], "row 1: the output is empty"),
        ([{"instruction": "a", "output": "b", "history": [["q"]]}], "`history` must be a list of"),
        ([{"conversations": [{"from": "bot", "value": "x"}]}], r"row 0, turn 0: expected \{\"from\": \"human\""),
        ([{"conversations": [{"from": "human", "value": "x"}]}], 'row 0: no "gpt" turn'),
        ([{"conversations": []}], "`conversations` must be a non-empty list"),
        ([TEXT[0], {"text": "  "}], "row 1: the text is empty"),
        ([{"text": ["a"]}], "`text` must be a string"),
        ([{"instruction": "a", "output": "b", "messages": []}], "columns of two formats"),
    ],
)
def test_detect_format_rejects_bad_alpaca_sharegpt_and_text_rows(rows, match):
    with pytest.raises(UserError, match=match):
        detect_format(rows)


def test_alpaca_is_a_user_turn_and_only_the_output_is_trained(tok):
    ex = Renderer(tok).example(ALPACA[0], "alpaca", 512)
    as_chat = [{"role": "user", "content": "Name the capital.\nFrance"}, {"role": "assistant", "content": "Paris"}]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(as_chat, tokenize=False)
    assert _trained_runs(tok, ex) == ["Paris<|im_end|>"]
    assert Renderer(tok).example({"messages": as_chat}, "chat", 512) == ex
    # An empty input adds nothing; system and history become turns (history responses trained too).
    assert _trained_runs(tok, Renderer(tok).example(ALPACA[1], "alpaca", 512)) == ["hello there<|im_end|>"]
    row = {"system": "Be brief.", "history": [["hi", "hello"]], "instruction": "and now?", "output": "json"}
    ex = Renderer(tok).example(row, "alpaca", 512)
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert _trained_runs(tok, ex) == ["hello<|im_end|>", "json<|im_end|>"]


def test_sharegpt_trains_every_gpt_turn_only(tok):
    ex = Renderer(tok).example(SHAREGPT[0], "sharegpt", 512)
    assert _trained_runs(tok, ex) == ["hello there<|im_end|>", "the answer is json<|im_end|>"]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    as_chat = [{"role": roles[m["from"]], "content": m["value"]} for m in SHAREGPT[0]["conversations"]]
    assert Renderer(tok).example({"messages": as_chat}, "chat", 512) == ex
    with_system_column = {"system": "Be brief.", "conversations": SHAREGPT[0]["conversations"][1:]}
    assert Renderer(tok).example(with_system_column, "sharegpt", 512) == ex


def test_text_trains_every_token_and_its_end(tok):
    ex = Renderer(tok).example(TEXT[0], "text", 512)
    assert ex.labels == ex.input_ids  # every token carries loss
    assert ex.input_ids[:-1] == tok(TEXT[0]["text"])["input_ids"] and ex.input_ids[-1] == tok.eos_token_id
    cut = Renderer(tok).example(TEXT[0], "text", 3)
    assert cut.truncated and cut.input_ids == ex.input_ids[:3] and cut.labels == cut.input_ids


@pytest.mark.parametrize("rows,fmt", [(CHAT, "chat"), (PC, "prompt_completion"), (ALPACA, "alpaca"),
                                      (SHAREGPT, "sharegpt"), (TEXT, "text")])
def test_batched_tokenization_equals_one_row_at_a_time(tok, rows, fmt):
    from data.render import Renderer

    assert Renderer(tok).examples(rows, fmt) == [Renderer(tok).example(row, fmt, 10_000) for row in rows]


def test_conversation_formats_need_a_chat_template():
    bare = build_tokenizer.__wrapped__()
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template, so alpaca rows"):
        Renderer(bare).example(ALPACA[0], "alpaca", 512)
    assert Renderer(bare).example(TEXT[0], "text", 512).input_ids  # text needs none


def test_csv_conversations_cell_is_json(tmp_path):
    _write(tmp_path / "sg.csv", SHAREGPT, "csv")
    assert load_rows(str(tmp_path / "sg.csv")) == SHAREGPT
