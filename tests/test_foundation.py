"""The foundation: the CLI answers, bad input is a clean error, planner imports stay light."""

import subprocess
import sys

import pytest

from data.errors import UserError
from data.sources import DEFAULT_MODEL, resolve_model


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("plan", "train", "evaluate", "compare", "lr-sweep", "pipeline", "demo", "sweep",
                    "promote", "rollback", "deploy", "serve", "export"):
        assert f"    {command} " in out.stdout, command


def test_data_and_planner_imports_pull_no_heavy_module():
    code = (
        "import sys, importlib, pkgutil, data, planner\n"
        "for package in (data, planner):\n"
        "    for m in pkgutil.iter_modules(package.__path__):\n"
        "        importlib.import_module(package.__name__ + '.' + m.name)\n"
        "heavy = [m for m in ('torch', 'transformers', 'prefect', 'mlflow', 'datasets') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_default_model_resolves_to_packaged_gguf():
    source = resolve_model(DEFAULT_MODEL)
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.local


def test_missing_gguf_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_model(str(tmp_path / "nope.gguf"))


def test_tiny_tokenizer_round_trips_chat():
    from tests.tiny import build_tokenizer

    tok = build_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|im_start|>user\nhi<|im_end|>")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text


def test_hub_id_tokenizer_fails_fast_offline(monkeypatch):
    import time

    from data.sources import hub_reachable, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()
    start = time.perf_counter()
    with pytest.raises(UserError, match="Could not load a tokenizer"):
        load_tokenizer("no-such-org/no-such-model")
    assert time.perf_counter() - start < 10


@pytest.mark.slow
def test_one_tokenizer_for_a_gguf_base_before_and_after_its_conversion(tmp_path, monkeypatch):
    """`data.sources.load_tokenizer` reads a GGUF base's tokenizer from the file until its weights are
    converted (a plan converts nothing), then from the converted copy: the same tokenizer either way, so
    the token cache the plan fills is the one training reads."""
    from data.sources import load_tokenizer, loadable_path
    from data.token_cache import tokenizer_fingerprint

    monkeypatch.setenv("LOWREGRET_CACHE", str(tmp_path))  # an empty model cache: nothing converted
    before = load_tokenizer(DEFAULT_MODEL)
    assert not (tmp_path / "models").exists()
    monkeypatch.delenv("LOWREGRET_CACHE")
    loadable_path(DEFAULT_MODEL)  # converted once per machine (~30 s), shared with the other tests
    after = load_tokenizer(DEFAULT_MODEL)
    assert tokenizer_fingerprint(before) == tokenizer_fingerprint(after)
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    assert before.apply_chat_template(messages) == after.apply_chat_template(messages)
    assert (before.pad_token_id, before.name_or_path) == (after.pad_token_id, after.name_or_path) == (
        after.eos_token_id, DEFAULT_MODEL)
