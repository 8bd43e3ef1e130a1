"""Adapters held by the server: where each comes from, and which are in memory right now.

An adapter source is a local peft directory (`adapter_config.json` + `adapter_model.safetensors`)
or a registry reference `NAME@ALIAS` / `NAME@VERSION` (MLflow model registry, resolved by
flows.registry and downloaded once). A registry alias is pinned to its version when the adapter is
added, so a served name never changes weights under a client's feet; add it again to follow a
moved alias. Sources that arrive over HTTP are confined to registry references and folders under
the server's adapter roots (`--adapter-root`), and what the server shows of a source never holds an
absolute path: a folder appears relative to its root or to the working directory.

At most `max_adapters` adapters sit in the peft model at once. The least recently used one is
deleted from the model when room is needed and loaded again from its local directory on the next
request that names it. Loading is atomic: the files are read and checked against the base before
the model changes, and a load peft fails half-way is undone, so a failed load leaves the served set
and the model as they were.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data.errors import UserError

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_REGISTRY_REF_RE = re.compile(r"^(?P<model>[^@/\\]+)@(?P<ref>[A-Za-z0-9_.-]+)$")
_LORA_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterNotFound(KeyError):
    """A served adapter name that is not registered with the pool."""


class AdapterExists(UserError):
    """A served name already in use (add again with `replace` to swap its weights)."""

    def __init__(self, name: str):
        super().__init__(
            f"An adapter named {name!r} is already served: DELETE /v1/adapters/{name} first or send "
            '"replace": true.'
        )
        self.name = name


@dataclass(frozen=True)
class AdapterEntry:
    """One registered adapter.

    Attributes:
        name: the served name (the `model` field of a request).
        source: what clients see of its origin: the registry reference, or the folder relative to
            the adapter root it lies in, else to the working directory, else its name. Never absolute.
        path: the local peft directory loaded into the model (never sent to clients).
        rank: LoRA rank `r` from adapter_config.json.
        base_model: `base_model_name_or_path` from adapter_config.json (None if absent).
        version: the registry version the source resolved to (None for a directory).
        mixable: whether peft can run it beside other adapters in one batch (not MoE expert LoRA).
    """

    name: str
    source: str
    path: str
    rank: int
    base_model: str | None
    version: str | None = None
    mixable: bool = True


def is_registry_ref(source: str) -> bool:
    """True for `NAME@ALIAS` / `NAME@VERSION` that is not an existing path."""
    return bool(_REGISTRY_REF_RE.match(source)) and not os.path.exists(source)


def read_adapter_config(path: str | Path, shown: str | None = None) -> dict:
    """adapter_config.json of a peft directory, with a clear error when it is not one.

    `shown` is how the directory is named in errors (default: `path`).
    """
    shown = shown or str(path)
    config_path = Path(path) / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(
            f"{shown} is not a peft adapter directory (no adapter_config.json). Pass the `adapter/` "
            "folder a LoRA training run wrote, or a registry reference NAME@ALIAS / NAME@VERSION."
        )
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{shown}/adapter_config.json is not valid JSON ({exc}): re-save the adapter.") from None


@dataclass(frozen=True)
class ResolvedSource:
    """A local adapter directory, and what the registry said about it (None for a plain directory)."""

    path: Path
    version: str | None = None
    base_model: str | None = None


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def public_source(source: str, path: Path | None, roots: Sequence[Path]) -> str:
    """How clients see a source: a registry reference as is, a folder relative to its adapter root
    or else to the working directory, else the folder's own name: no answer holds an absolute path."""
    if path is None:
        return source
    real = Path(os.path.realpath(path))
    for base in (*roots, Path.cwd()):
        real_base = Path(os.path.realpath(base))
        if _inside(real, real_base):
            return real.relative_to(real_base).as_posix() or "."
    return real.name


def _confined_dir(source: str, roots: Sequence[Path]) -> Path:
    """The folder `source` names under one of `roots` (relative: looked up in each root in turn).

    Raises:
        UserError: no roots, or the folder is missing or lies outside every root (symlinks resolved).
    """
    rule = (
        "Adapters loaded over HTTP come from the model registry (NAME@ALIAS, NAME@VERSION) or from a "
        "folder under the server's --adapter-root"
    )
    if not roots:
        raise UserError(f"{rule}, and this server has no --adapter-root: send a registry reference.")
    candidates = [Path(source)] if os.path.isabs(source) else [Path(root) / source for root in roots]
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if any(_inside(real, Path(os.path.realpath(root))) for root in roots) and real.is_dir():
            return real
    raise UserError(
        f"{rule}: {source if not os.path.isabs(source) else 'that absolute path'!r} is not a folder "
        "under any adapter root. Send the folder's path relative to the adapter root."
    )


def resolve_source(source: str, roots: Sequence[Path] = (), confined: bool = False) -> ResolvedSource:
    """The local adapter directory for `source` (a registry reference is downloaded once).

    Args:
        source: `NAME@ALIAS`, `NAME@VERSION` or a directory.
        roots: the adapter roots; with `confined`, a directory must lie under one of them.
        confined: the source came over HTTP (admin API), not from the operator's command line.

    Raises:
        UserError: the directory does not exist or is not allowed, or the registry reference is unknown.
    """
    if is_registry_ref(source):
        from serving.registry import download_adapter  # MLflow imported only when needed

        return download_adapter(source)
    if confined:
        return ResolvedSource(_confined_dir(source, roots))
    if not os.path.isdir(source):
        raise UserError(
            f"Adapter source {source!r} is neither a directory nor a registry reference "
            "NAME@ALIAS / NAME@VERSION: check the path or the registered model name."
        )
    return ResolvedSource(Path(source))


def describe_adapter(
    name: str, source: str, roots: Sequence[Path] = (), confined: bool = False
) -> AdapterEntry:
    """Resolve `source`, check it is a LoRA adapter peft can mix in a batch, and describe it."""
    if not _NAME_RE.match(name) or name == "__base__":
        raise UserError(
            f"Adapter name {name!r} is not allowed: use 1-128 characters from letters, digits and "
            "._:@- starting with a letter or digit (and not '__base__')."
        )
    resolved = resolve_source(source, roots, confined)
    shown = public_source(source, None if resolved.version else resolved.path, roots)
    config = read_adapter_config(resolved.path, shown=shown if confined else None)
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{shown} holds a {config.get('peft_type')!r} adapter; the server serves LoRA adapters only."
        )
    if config.get("use_dora"):
        # peft raises "Cannot pass `adapter_names` when DoRA is enabled" in mixed batches.
        raise UserError(
            f"{shown} is a DoRA adapter; peft cannot mix DoRA adapters in a batch. Serve a plain LoRA."
        )
    return AdapterEntry(
        name=name,
        source=shown,
        path=str(resolved.path),
        rank=int(config.get("r", 0)),
        base_model=resolved.base_model or config.get("base_model_name_or_path"),
        version=resolved.version,
        # peft's ParamWrapper (MoE expert LoRA) refuses adapter_names: "does not support mixed
        # adapter batches yet" (peft 0.21), and that holds for every row once it is in the model.
        mixable=not config.get("target_parameters"),
    )


def check_adapter_files(base_model, entry: AdapterEntry) -> None:
    """Read the adapter's weights in full and check every LoRA matrix against `base_model`, before
    the model is touched.

    Only safetensors is read: a legacy `adapter_model.bin` is a pickle, and nothing loaded from disk
    may run code. Keys look like `base_model.model.<module path>.lora_A.weight`; lora_A is r x d_in
    and lora_B is d_out x r (peft's layout), compared with the module's in_features / out_features.

    Raises:
        UserError: no safetensors file, a file safetensors cannot read, or a matrix that does not fit.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"Adapter {entry.name!r} ({entry.source})"
    weights = Path(entry.path) / WEIGHTS_FILE
    if not weights.is_file():
        pickled = (Path(entry.path) / "adapter_model.bin").is_file()
        raise UserError(
            f"{where} has no {WEIGHTS_FILE}"
            + (
                " (only adapter_model.bin, a pickle, which this server never loads because unpickling "
                "can run code). Re-save it with peft's save_pretrained (safetensors is its default)."
                if pickled
                else ": pass the folder peft's save_pretrained wrote."
            )
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{where}: {WEIGHTS_FILE} is not a readable safetensors file ({exc}); re-save it.") from None

    def fail(problem: str) -> UserError:
        return UserError(
            f"{where} does not fit the served base model: {problem}. "
            f"It was trained on {entry.base_model!r}; serve it with that base."
        )

    lora_keys = 0
    for key, tensor in tensors.items():
        match = _LORA_KEY_RE.match(key)
        if not match:
            continue
        lora_keys += 1
        # peft nests a second wrapper of the same module (MoE expert target_parameters) as
        # `<module>.base_layer`: the base module is the path without those suffixes.
        module_path = re.sub(r"(\.base_layer)+$", "", match["module"])
        try:
            module = base_model.get_submodule(module_path)
        except AttributeError:
            raise fail(f"the base has no module {module_path!r}") from None
        d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        shape = tuple(tensor.shape)
        if len(shape) != 2:
            continue  # not a plain matrix: peft's own load checks it
        expected_dim, got_dim = (d_in, shape[1]) if match["ab"] == "A" else (d_out, shape[0])
        if expected_dim is not None and expected_dim != got_dim:
            raise fail(f"{key} has shape {shape} but {module_path} is {d_out}x{d_in}")
    if lora_keys == 0:
        raise UserError(f"{where}: {WEIGHTS_FILE} holds no LoRA matrices (lora_A / lora_B); re-save it.")


def _strip_lora_layers(model) -> None:
    """Put back every layer peft wrapped, as PeftModel.unload does, for a model whose wrapping failed
    half-way (peft mutates the base in place before it can hand back a PeftModel to unload)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    outermost = [n for n in wrapped if not any(n.startswith(other + ".") for other in wrapped)]
    for name in outermost:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


class AdapterPool:
    """The base model plus a bounded, least-recently-used set of resident peft adapters.

    Callers hold `lock` around `acquire` and the model call that follows, so an adapter is never
    evicted while a batch uses it. Reads (`entries`, `__contains__`, `resident_names`) take no lock:
    the HTTP event loop must never wait for a batch.
    """

    def __init__(self, base_model, max_adapters: int = 8):
        if max_adapters < 1:
            raise UserError(f"max_adapters must be at least 1 (got {max_adapters}).")
        self.model = base_model  # wrapped in a PeftModel when the first adapter loads
        self._base = base_model
        self.max_adapters = max_adapters
        self.lock = threading.RLock()
        self._entries: dict[str, AdapterEntry] = {}  # served name -> entry
        self._peft_names: dict[str, str] = {}  # served name -> name inside peft (no dots allowed there)
        self._resident: OrderedDict[str, AdapterEntry] = OrderedDict()  # peft name -> entry, LRU first
        self._next_id = 0
        self.loads = 0  # how many times an adapter was loaded into the model (tests, metrics)
        self.evictions = 0

    def entries(self) -> list[AdapterEntry]:
        return list(self._entries.values())

    def resident_names(self) -> list[str]:
        return [entry.name for entry in list(self._resident.values())]

    def resident_mixable(self) -> bool:
        """Whether peft can mix adapters in a batch with the adapters now in the model."""
        return all(entry.mixable for entry in self._resident.values())

    def is_resident(self, name: str) -> bool:
        return self._peft_names.get(name) in self._resident

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def add(self, entry: AdapterEntry, replace: bool = False) -> None:
        """Serve `entry`, loading it now so a broken adapter fails here, not on a request.

        With `replace`, the adapter already served under that name keeps answering until the new
        one has loaded. On any failure nothing changes: not the served set, not the model.

        Raises:
            UserError: the name is taken (without `replace`), or the adapter does not load or fit.
        """
        check_adapter_files(self._base, entry)  # reads the files outside the lock: batches go on
        with self.lock:
            if entry.name in self._entries and not replace:
                raise AdapterExists(entry.name)
            peft_name = f"adapter_{self._next_id}"
            self._next_id += 1
            old = self._peft_names.get(entry.name)
            self._load(entry, peft_name, pinned={peft_name})
            self._entries[entry.name] = entry
            self._peft_names[entry.name] = peft_name
            if old in self._resident:
                self._unload(old)

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self._entries:
                raise AdapterNotFound(name)
            peft_name = self._peft_names.pop(name)
            del self._entries[name]
            if peft_name in self._resident:
                self._unload(peft_name)

    def acquire(self, names: set[str]) -> dict[str, str]:
        """Make every adapter in `names` resident; return served name -> peft adapter name.

        Raises:
            AdapterNotFound: a name is not registered (it may have been removed meanwhile).
        """
        if len(names) > self.max_adapters:
            raise ValueError(f"{len(names)} adapters in one batch but max_adapters={self.max_adapters}")
        with self.lock:
            for name in names:
                if name not in self._entries:
                    raise AdapterNotFound(name)
            wanted = {self._peft_names[name] for name in names}
            for name in names:
                peft_name = self._peft_names[name]
                if peft_name in self._resident:
                    self._resident.move_to_end(peft_name)
                else:
                    self._load(self._entries[name], peft_name, pinned=wanted)
            return {name: self._peft_names[name] for name in names}

    def _load(self, entry: AdapterEntry, peft_name: str, pinned: set[str]) -> None:
        """Load into the model, then evict least recently used adapters (not `pinned`) down to the limit.

        Loading before evicting means a failed load has evicted nothing.
        """
        log.info("loading adapter %s from %s", entry.name, entry.source)
        try:
            self._inject(entry, peft_name)
        except Exception as exc:
            self._rebuild()  # peft may have wrapped layers or registered the name before it failed
            message = str(exc).replace(entry.path, entry.source)
            raise UserError(
                f"Adapter {entry.name!r} ({entry.source}) does not load into the served base model: "
                f"{type(exc).__name__}: {message}. It was trained on {entry.base_model!r}; serve it with that base."
            ) from None
        self._resident[peft_name] = entry
        self.loads += 1
        while len(self._resident) > self.max_adapters:
            victim = next(p for p in self._resident if p not in pinned)
            log.info("evicting adapter %s (least recently used)", self._resident[victim].name)
            self._unload(victim)
            self.evictions += 1

    def _inject(self, entry: AdapterEntry, peft_name: str) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(entry.path, adapter_name=peft_name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(
                self.model, entry.path, adapter_name=peft_name, is_trainable=False
            )
        self.model.eval()
        self._keep_active_adapter_valid()

    def _unload(self, peft_name: str) -> None:
        entry = self._resident.pop(peft_name)
        self.model.delete_adapter(peft_name)
        if not entry.mixable and self.resident_mixable():
            # delete_adapter leaves peft's (now empty) expert ParamWrapper layers in the model, and
            # they refuse `adapter_names` even with no adapter of theirs left: without a rebuild, one
            # MoE expert adapter would end mixed batching for good.
            self._rebuild()
        self._keep_active_adapter_valid()

    def _rebuild(self) -> None:
        """Strip every LoRA layer from the base and load the resident adapters again, under their
        peft names. An adapter that no longer loads (its files changed) stops being resident."""
        from peft import PeftModel

        while True:
            base = self.model.unload() if isinstance(self.model, PeftModel) else self.model
            _strip_lora_layers(base)
            self.model = self._base = base
            try:
                for peft_name, entry in self._resident.items():
                    failed = peft_name
                    self._inject(entry, peft_name)
                return
            except Exception:
                log.exception("adapter %s no longer loads; it is no longer resident", self._resident[failed].name)
                del self._resident[failed]

    def _keep_active_adapter_valid(self) -> None:
        """peft leaves PeftModel.active_adapter naming a deleted adapter once the last one is gone, and
        `generate` looks it up even when `adapter_names` picks each row's adapter."""
        configs = getattr(self.model, "peft_config", None)
        if configs and self.model.active_adapter not in configs:
            self.model.set_adapter(next(iter(configs)))
