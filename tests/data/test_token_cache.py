"""data.token_cache: a dataset is tokenized once per (data, tokenizer) and read back exactly."""

import json

import pytest

from data import token_cache
from data.dataset import load_rows
from data.errors import UserError
from data.render import Renderer
from tests.tiny import build_tokenizer

ALPACA = [{"instruction": f"Name item {i}.", "input": "", "output": f"item number {i}"} for i in range(12)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWREGRET_TOKEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tok():
    return build_tokenizer()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _count_tokenizations(monkeypatch) -> list:
    calls = []
    real = token_cache.Renderer.examples

    def counting(self, rows, *args, **kwargs):
        calls.append(len(rows))
        return real(self, rows, *args, **kwargs)

    monkeypatch.setattr(token_cache.Renderer, "examples", counting)
    return calls


def test_second_read_neither_parses_nor_tokenizes(tmp_path, cache, tok, monkeypatch):
    path = _write(tmp_path / "a.jsonl", ALPACA)
    calls = _count_tokenizations(monkeypatch)
    first = token_cache.tokenized_dataset(str(path), tok)
    assert calls == [12] and first.rows == 12 and first.format == "alpaca"

    def no_parsing(*args, **kwargs):
        raise AssertionError("the unchanged file was parsed again")

    monkeypatch.setattr(token_cache, "load_rows", no_parsing)
    again = token_cache.tokenized_dataset(str(path), tok)
    assert calls == [12] and again.fingerprint == first.fingerprint and again.path == first.path
    assert token_cache.find_cached(str(path), tok).path == first.path


def test_cached_examples_equal_the_renderers_at_any_max_length(tmp_path, cache, tok):
    path = _write(tmp_path / "a.jsonl", ALPACA)
    data = token_cache.tokenized_dataset(str(path), tok)
    for max_length in (10_000, 26):
        expected = [Renderer(tok).example(row, "alpaca", max_length, row_index=i) for i, row in enumerate(ALPACA)]
        assert data.examples([0, 5, 11], max_length) == [expected[i] for i in (0, 5, 11)]
        assert any(e.truncated for e in expected) == (max_length == 26)
    assert data.column("completion_text", [3]) == ["item number 3"]
    assert data.column("n_tokens") == [len(e.input_ids) for e in data.examples(list(range(12)), 10_000)]


def test_prompt_filling_max_length_names_the_row(tmp_path, cache, tok):
    rows = ALPACA[:3] + [{"instruction": "very long " * 30, "input": "", "output": "x"}]
    data = token_cache.tokenized_dataset(str(_write(tmp_path / "a.jsonl", rows)), tok)
    with pytest.raises(UserError, match="Row 3: the prompt alone is"):
        data.check_max_length(32)
    with pytest.raises(UserError, match="Row 3: the prompt alone is"):
        data.examples([0, 3], 32)
    data.check_max_length(32, indices=[0, 1, 2])  # the other rows fit


def test_a_changed_file_or_another_tokenizer_is_tokenized_again(tmp_path, cache, tok, monkeypatch):
    path = _write(tmp_path / "a.jsonl", ALPACA)
    calls = _count_tokenizations(monkeypatch)
    first = token_cache.tokenized_dataset(str(path), tok)
    _write(path, ALPACA[:6])
    changed = token_cache.tokenized_dataset(str(path), tok)
    assert changed.rows == 6 and changed.fingerprint != first.fingerprint
    other = build_tokenizer.__wrapped__()
    other.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}" \
                          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    assert token_cache.tokenizer_fingerprint(other) != token_cache.tokenizer_fingerprint(tok)
    assert token_cache.tokenized_dataset(str(path), other).path != changed.path
    assert calls == [12, 6, 6]
    # A limit is a different set of rows.
    assert token_cache.tokenized_dataset(str(path), tok, limit=2).rows == 2


def test_bad_rows_write_nothing(tmp_path, cache, tok):
    path = _write(tmp_path / "bad.jsonl", [{"question": "a"}])
    with pytest.raises(UserError, match="match no accepted format"):
        token_cache.tokenized_dataset(str(path), tok)
    assert not cache.exists() or not any(p for p in cache.iterdir() if p.name != "sources")


def test_builtins_are_cached_by_name(cache, tok, monkeypatch):
    source = "builtin:facts?n_facts=20&choices=4"
    first = token_cache.tokenized_dataset(source, tok)
    monkeypatch.setattr(token_cache, "load_rows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    assert token_cache.tokenized_dataset(source, tok).path == first.path and first.rows == 20
    assert len(load_rows(source)) == 20


def test_profile_reads_the_cache_and_gives_the_same_numbers(tmp_path, cache, tok, monkeypatch):
    from planner.profile import profile_dataset

    path = str(_write(tmp_path / "a.jsonl", ALPACA * 3))
    cold = profile_dataset(path, tok, sample_size=10)  # sampled, nothing cached yet
    assert token_cache.find_cached(path, tok) is None
    token_cache.tokenized_dataset(path, tok)
    calls = _count_tokenizations(monkeypatch)
    for name in ("load_rows", "Renderer"):
        monkeypatch.setattr(f"planner.profile.{name}", lambda *a, n=name, **k: (_ for _ in ()).throw(AssertionError(n)))
    assert profile_dataset(path, tok, sample_size=10) == cold
    assert calls == []


def test_a_saved_folder_is_not_read_again_while_unchanged(tmp_path, cache, tok, monkeypatch):
    """A `save_to_disk` folder is known by its files' names, sizes and times, as a file is by its own:
    the second read neither parses nor tokenizes; a changed folder is read again."""
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ALPACA * 3).save_to_disk(str(folder))
    first = token_cache.tokenized_dataset(str(folder), tok)
    monkeypatch.setattr(token_cache, "load_rows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    assert token_cache.tokenized_dataset(str(folder), tok).path == first.path
    assert token_cache.find_cached(str(folder), tok).path == first.path
    monkeypatch.undo()
    datasets.Dataset.from_list(ALPACA * 2).save_to_disk(str(tmp_path / "other"))
    import shutil

    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "other", folder)
    assert token_cache.tokenized_dataset(str(folder), tok).rows == len(ALPACA) * 2


def test_a_hub_dataset_is_known_by_its_datasets_fingerprint(cache, tok, monkeypatch):
    """A Hub id is known by the fingerprint `datasets` keeps for its cached split: the second read
    converts no row (the split itself is memory-mapped, as `datasets` loads it)."""
    import datasets

    split = datasets.Dataset.from_list(ALPACA * 3)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None: split_of[name])
    split_of = {"org/data": split}
    first = token_cache.tokenized_dataset("org/data", tok)
    monkeypatch.setattr(token_cache, "load_rows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    assert token_cache.tokenized_dataset("org/data", tok).path == first.path
    split_of["org/data"] = datasets.Dataset.from_list(ALPACA * 2)  # the Hub's data changed: another fingerprint
    monkeypatch.undo()
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None: split_of[name])
    assert token_cache.tokenized_dataset("org/data", tok).rows == len(ALPACA) * 2


def test_a_killed_builds_temporary_is_removed_by_the_next_build(tmp_path, cache, tok):
    """An abort or kill -9 mid-build leaves `.KEY.xxxx/`; the next build of that entry removes it once it has
    been untouched for an hour, and leaves a live build's (recently written) alone."""
    import os
    import time

    from data.token_cache import _entry_key, tokenizer_fingerprint

    path = _write(tmp_path / "a.jsonl", ALPACA)
    rows = load_rows(str(path))
    from data.dataset import dataset_fingerprint

    key = _entry_key(dataset_fingerprint(rows), tokenizer_fingerprint(tok))
    root = token_cache.cache_root()
    root.mkdir(parents=True, exist_ok=True)
    dead, live = root / f".{key}.dead", root / f".{key}.live"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "data.arrow").write_bytes(b"partial")
    old = time.time() - 2 * 3600
    for p in (dead / "data.arrow", dead):
        os.utime(p, (old, old))
    token_cache.tokenized_dataset(str(path), tok)
    assert not dead.exists() and live.exists()
