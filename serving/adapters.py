"""Adapters held by the server: where each comes from, and which are in memory right now.

An adapter source is a local peft directory (`adapter_config.json` + weights) or a registry
reference `NAME@ALIAS` / `NAME@VERSION` (MLflow model registry, resolved by flows.registry and
downloaded once). A registry alias is pinned to its version when the adapter is added, so a
served name never changes weights under a client's feet; add it again to follow a moved alias.

At most `max_adapters` adapters sit in the peft model at once. The least recently used one is
deleted from the model when room is needed and loaded again from its local directory on the next
request that names it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from planner.errors import UserError

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_REGISTRY_REF_RE = re.compile(r"^(?P<model>[^@/\\]+)@(?P<ref>[A-Za-z0-9_.-]+)$")


class AdapterNotFound(KeyError):
    """A served adapter name that is not registered with the pool."""


@dataclass(frozen=True)
class AdapterEntry:
    """One registered adapter.

    Attributes:
        name: the served name (the `model` field of a request).
        source: what the user gave: a directory, or `NAME@ALIAS` / `NAME@VERSION`.
        path: the local peft directory loaded into the model.
        rank: LoRA rank `r` from adapter_config.json.
        base_model: `base_model_name_or_path` from adapter_config.json (None if absent).
        version: the registry version the source resolved to (None for a directory).
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


def read_adapter_config(path: str | Path) -> dict:
    """adapter_config.json of a peft directory, with a clear error when it is not one."""
    config_path = Path(path) / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(
            f"{path} is not a peft adapter directory (no adapter_config.json). Pass the `adapter/` "
            "folder a LoRA training run wrote, or a registry reference NAME@ALIAS / NAME@VERSION."
        )
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc}): re-save the adapter.") from exc


@dataclass(frozen=True)
class ResolvedSource:
    """A local adapter directory, and what the registry said about it (None for a plain directory)."""

    path: Path
    version: str | None = None
    base_model: str | None = None


def resolve_source(source: str) -> ResolvedSource:
    """The local adapter directory for `source` (a registry reference is downloaded once).

    Raises:
        UserError: the directory does not exist, or the registry reference is unknown.
    """
    if is_registry_ref(source):
        from serving.registry import download_adapter  # MLflow imported only when needed

        return download_adapter(source)
    if not os.path.isdir(source):
        raise UserError(
            f"Adapter source {source!r} is neither a directory nor a registry reference "
            "NAME@ALIAS / NAME@VERSION: check the path or the registered model name."
        )
    return ResolvedSource(Path(source))


def describe_adapter(name: str, source: str) -> AdapterEntry:
    """Resolve `source`, check it is a LoRA adapter peft can mix in a batch, and describe it."""
    if not _NAME_RE.match(name) or name == "__base__":
        raise UserError(
            f"Adapter name {name!r} is not allowed: use 1-128 characters from letters, digits and "
            "._:@- starting with a letter or digit (and not '__base__')."
        )
    resolved = resolve_source(source)
    path = resolved.path
    config = read_adapter_config(path)
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{path} holds a {config.get('peft_type')!r} adapter; the server serves LoRA adapters only."
        )
    if config.get("use_dora"):
        # peft raises "Cannot pass `adapter_names` when DoRA is enabled" in mixed batches.
        raise UserError(
            f"{path} is a DoRA adapter; peft cannot mix DoRA adapters in a batch. Serve a plain LoRA."
        )
    return AdapterEntry(
        name=name,
        source=source,
        path=str(path),
        rank=int(config.get("r", 0)),
        base_model=resolved.base_model or config.get("base_model_name_or_path"),
        version=resolved.version,
        # peft's ParamWrapper (MoE expert LoRA) refuses adapter_names: "does not support mixed
        # adapter batches yet" (peft 0.21), and that holds for every row once it is in the model.
        mixable=not config.get("target_parameters"),
    )


def check_fits(base_model, entry: AdapterEntry) -> None:
    """Every LoRA matrix in the adapter's safetensors file matches a module of `base_model`.

    Keys look like `base_model.model.<module path>.lora_A.weight`; lora_A is r x d_in and lora_B is
    d_out x r (peft's layout), compared with the module's in_features / out_features.
    """
    weights = Path(entry.path) / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a legacy adapter_model.bin: peft's own load reports mismatches
    from safetensors import safe_open

    def fail(problem: str) -> UserError:
        return UserError(
            f"Adapter {entry.name!r} ({entry.path}) does not fit the served base model: {problem}. "
            f"It was trained on {entry.base_model!r}; serve it with that base."
        )

    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            match = re.match(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$", key)
            if not match:
                continue
            # peft nests a second wrapper of the same module (MoE expert target_parameters) as
            # `<module>.base_layer`: the base module is the path without those suffixes.
            module_path = re.sub(r"(\.base_layer)+$", "", match["module"])
            try:
                module = base_model.get_submodule(module_path)
            except AttributeError:
                raise fail(f"the base has no module {module_path!r}") from None
            d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
            shape = handle.get_slice(key).get_shape()
            expected_dim, got_dim = (d_in, shape[1]) if match["ab"] == "A" else (d_out, shape[0])
            if expected_dim is not None and expected_dim != got_dim:
                raise fail(f"{key} has shape {tuple(shape)} but {module_path} is {d_out}x{d_in}")


class AdapterPool:
    """The base model plus a bounded, least-recently-used set of resident peft adapters.

    Callers hold `lock` around `acquire` and the model call that follows, so an adapter is never
    evicted while a batch uses it.
    """

    def __init__(self, base_model, max_adapters: int = 8):
        if max_adapters < 1:
            raise UserError(f"max_adapters must be at least 1 (got {max_adapters}).")
        self.model = base_model  # wrapped in a PeftModel when the first adapter loads
        self._base = base_model
        self.max_adapters = max_adapters
        self.lock = threading.RLock()
        self._entries: dict[str, AdapterEntry] = {}
        self._peft_names: dict[str, str] = {}  # served name -> name inside peft (no dots allowed there)
        self._resident: OrderedDict[str, None] = OrderedDict()  # served names, least recent first
        self._next_id = 0
        self.loads = 0  # how many times an adapter was loaded into the model (tests, metrics)
        self.evictions = 0

    def entries(self) -> list[AdapterEntry]:
        with self.lock:
            return list(self._entries.values())

    def resident_mixable(self) -> bool:
        """Whether peft can mix adapters in a batch with the adapters now in the model."""
        return all(self._entries[name].mixable for name in self._resident)

    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def add(self, entry: AdapterEntry, replace: bool = False) -> None:
        """Register `entry` and load it now, so a broken adapter fails here, not on a request."""
        with self.lock:
            if entry.name in self._entries:
                if not replace:
                    raise UserError(
                        f"An adapter named {entry.name!r} is already served; remove it first or pass replace."
                    )
                self.remove(entry.name)
            self._entries[entry.name] = entry
            self._peft_names[entry.name] = f"adapter_{self._next_id}"
            self._next_id += 1
            try:
                self._load(entry.name, pinned=set())
            except Exception:
                del self._entries[entry.name]
                del self._peft_names[entry.name]
                raise

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self._entries:
                raise AdapterNotFound(name)
            if name in self._resident:
                self._unload(name)
            del self._entries[name]
            del self._peft_names[name]

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
            for name in names:
                if name in self._resident:
                    self._resident.move_to_end(name)
                else:
                    self._load(name, pinned=names)
            return {name: self._peft_names[name] for name in names}

    def _load(self, name: str, pinned: set[str]) -> None:
        from peft import PeftModel

        while len(self._resident) >= self.max_adapters:
            victim = next(n for n in self._resident if n not in pinned)
            log.info("evicting adapter %s (least recently used)", victim)
            self._unload(victim)
            self.evictions += 1
        entry, peft_name = self._entries[name], self._peft_names[name]
        # Checked before peft touches the model: a failed load can leave half-injected layers.
        check_fits(self._base, entry)
        log.info("loading adapter %s from %s", name, entry.path)
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(entry.path, adapter_name=peft_name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(
                    self.model, entry.path, adapter_name=peft_name, is_trainable=False
                )
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise UserError(
                f"Adapter {name!r} ({entry.path}) does not load into the served base model: {exc}. "
                f"It was trained on {entry.base_model!r}; serve it with that base."
            ) from exc
        self.model.eval()
        self._resident[name] = None
        self.loads += 1
        self._keep_active_adapter_valid()

    def _unload(self, name: str) -> None:
        self.model.delete_adapter(self._peft_names[name])
        del self._resident[name]
        if not self._entries[name].mixable and self.resident_mixable():
            self._rewrap()
        self._keep_active_adapter_valid()

    def _rewrap(self) -> None:
        """Strip every LoRA layer and load the resident adapters again.

        delete_adapter leaves peft's (now empty) expert ParamWrapper layers in the model, and they
        refuse `adapter_names` even when no adapter of theirs is left: without this, one MoE expert
        adapter would end mixed batching for good.
        """
        resident = list(self._resident)
        self.model = self._base = self.model.unload()
        self._resident.clear()
        for name in resident:
            self._load(name, pinned=set(resident))

    def _keep_active_adapter_valid(self) -> None:
        """peft leaves PeftModel.active_adapter naming a deleted adapter once the last one is gone, and
        `generate` looks it up even when `adapter_names` picks each row's adapter."""
        configs = self.model.peft_config
        if configs and self.model.active_adapter not in configs:
            self.model.set_adapter(next(iter(configs)))
