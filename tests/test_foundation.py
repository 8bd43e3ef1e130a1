"""The foundation: the CLI answers, bad input is a clean error, planner imports stay light."""

import subprocess
import sys

import pytest

from planner.errors import UserError
from planner.sources import DEFAULT_MODEL, resolve_model


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("plan", "train", "evaluate", "compare", "lr-sweep", "pipeline", "demo", "sweep",
                    "promote", "rollback", "deploy", "serve", "export"):
        assert f"    {command} " in out.stdout, command


def test_planner_import_pulls_no_heavy_module():
    code = (
        "import sys, importlib, pkgutil, planner\n"
        "for m in pkgutil.iter_modules(planner.__path__):\n"
        "    importlib.import_module('planner.' + m.name)\n"
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

    from planner.sources import hub_reachable, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()
    start = time.perf_counter()
    with pytest.raises(UserError, match="Could not load a tokenizer"):
        load_tokenizer("no-such-org/no-such-model")
    assert time.perf_counter() - start < 10
