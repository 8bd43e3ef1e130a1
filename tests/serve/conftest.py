"""Two tiny LoRA adapters that answer the same prompt differently, and a client for the server."""

from __future__ import annotations

import contextlib
import http.client
import json
from pathlib import Path

import pytest

PROMPT = "The capital of France is"
# Each adapter memorises its own continuation of PROMPT, so greedy outputs differ sharply.
TEXTS = {"paris": " Paris. The capital of France is Paris.", "docs": " json dumps sorted zip map open."}


def train_adapter(
    base_dir: Path, out: Path, text: str, steps: int = 30, rank: int = 8, **lora_kwargs
) -> Path:
    """A few optimizer steps of LoRA on one sequence: enough to make its greedy output its own."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.tiny import build_tokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=rank,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        **lora_kwargs,
    )
    model = get_peft_model(base, config)
    ids = build_tokenizer()(PROMPT + text, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


@contextlib.contextmanager
def one_torch_thread():
    """Two cores shared by many processes: one intra-op thread runs these tiny models ~30x faster
    than two threads spinning against each other (measured: 0.5 s vs 0.015 s per training step).
    Restored afterwards, so tests of other packages keep torch's default."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread_per_module():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def base_dir(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="session")
def adapters(base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    with one_torch_thread():  # session fixtures run before the module-scoped thread setting
        return {name: train_adapter(base_dir, root / name, text) for name, text in TEXTS.items()}


def chat_prompt_ids(messages: list[dict]) -> list[int]:
    """The prompt the server builds for a chat request: the tiny tokenizer's chat template."""
    from tests.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def offline_generate(
    base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int
) -> str:
    """What peft gives for one prompt with one adapter, greedy, outside the server."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


ADMIN_TOKEN = "s3cret-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def start(
    base_dir: Path,
    adapter_dirs: dict[str, Path],
    max_adapters: int = 8,
    admin_token: str | None = ADMIN_TOKEN,
    adapter_roots: tuple[Path, ...] = (),
    max_pending: int = 256,
    **limits,
):
    """A running server over the tiny base with the given adapters (call .stop()); admin on with
    ADMIN_TOKEN unless admin_token=None."""
    from serving.adapters import describe_adapter
    from serving.admin import AdminOptions
    from serving.engine import Engine, load_base_model
    from serving.server import ServerLimits, start_server

    model, tokenizer = load_base_model(str(base_dir), "cpu")
    engine = Engine(
        model, tokenizer, base_name="tiny-base", max_adapters=max_adapters, batch_window_s=0.05,
        max_pending=max_pending,
    )  # fmt: skip
    for name, path in adapter_dirs.items():
        engine.pool.add(describe_adapter(name, str(path)))
    admin = AdminOptions(token=admin_token, adapter_roots=tuple(adapter_roots))
    return start_server(engine, "127.0.0.1", 0, ServerLimits(**limits), admin)


class Client:
    """Raw HTTP over loopback, so tests can send what a well-behaved client never would."""

    def __init__(self, url: str):
        host_port = url.removeprefix("http://")
        self.host, self.port = host_port.split(":")[0], int(host_port.split(":")[1])

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, data, response.headers  # case-insensitive, as HTTP headers are
        finally:
            conn.close()

    def call(self, method: str, path: str, payload=None, headers: dict | None = None):
        body = None if payload is None else json.dumps(payload).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        status, data, _ = self.raw(method, path, body, all_headers)
        return status, json.loads(data) if data else None

    def complete(self, model: str, prompt: str = PROMPT, **fields):
        return self.call("POST", "/v1/completions", {"model": model, "prompt": prompt, **fields})
