"""The one config kit: YAML presets, `key=value` overrides, coercion by annotation, unknown keys
and `--help` text, for every config dataclass (the trainer's `TrainConfig` and `RLConfig`, the
flows' pipeline, RL-pipeline and sweep configs). A config object holds values and checks them; it
does no I/O: reading a file and applying overrides happen here, before it is built.

Safe: YAML is read with a `yaml.SafeLoader` subclass (no Python object is ever constructed).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import typing
from pathlib import Path

from data.errors import UserError


def load(cls, path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), kind: str = ""):
    """A `cls` from a YAML preset (or the defaults when `path` is None) plus `key=value` overrides.

    Raises:
        UserError: missing file, malformed YAML or override, unknown key, or an invalid value.
    """
    data = read_yaml_mapping(path)
    apply_overrides(data, overrides)
    return build(cls, data, kind)


def build(cls, data: dict, kind: str = ""):
    """`cls(**data)` after refusing keys `cls` has no field for (listing the valid ones).

    Raises:
        UserError: an unknown key, or what `cls` refuses.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        what = f"{kind} option(s)" if kind else "option(s)"
        raise UserError(f"Unknown {what} {', '.join(unknown)}. Valid options: {', '.join(names)}.")
    try:
        return cls(**data)
    except TypeError as exc:  # a wrongly typed value reaching a dataclass field
        raise UserError(f"Bad config: {exc}") from exc


def parse_yaml(text: str):
    """`yaml.safe_load` with YAML 1.2's booleans: only true/false (any case) are booleans.

    PyYAML follows YAML 1.1, where yes/no/on/off/y/n are booleans too, so the documented
    `mixed_precision=no` arrived as False and was refused. Safe: no Python object is constructed.
    """
    import yaml

    from data import guard

    if len(text) > guard.limit("yaml_bytes"):
        raise guard.over("yaml_bytes", "The config", len(text), "a config holds options, not data.")
    try:
        value = yaml.load(text, Loader=_config_loader())  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise guard.over("json_depth", "The config's nesting depth", 10**3, "a config is a few levels deep.") from None
    _check_size(value)
    return value


def _check_size(value) -> None:
    """Refuse a config whose values, aliases expanded, number more than `yaml_nodes` (an alias bomb:
    1.2 KB of YAML that stands for billions of values, which every later walk or message would expand).
    Counts without expanding, and stops at the limit."""
    from data import guard

    most, seen, stack = guard.limit("yaml_nodes"), 0, [value]
    while stack:
        item = stack.pop()
        seen += 1
        if seen > most:
            raise guard.over("yaml_nodes", "The config's number of values (YAML aliases expanded)", seen,
                             "write the values out; aliases that repeat aliases multiply.")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


@functools.cache
def _config_loader():
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        """SafeLoader whose implicit booleans are YAML 1.2's."""

    bool_tag = "tag:yaml.org,2002:bool"
    ConfigLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    ConfigLoader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    return ConfigLoader


def read_yaml_mapping(path: str | Path | None) -> dict:
    """The mapping a YAML config file holds ({} when `path` is None), or a UserError saying why not."""
    import yaml

    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file {str(path)!r} not found: pass an existing YAML file (see configs/).")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8.") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of option: value, not {type(data).__name__}.")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> None:
    """Set each `key=value` (value parsed as a YAML scalar) in `data`; `a.b=v` sets data["a"]["b"]."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"Override {item!r} must look like key=value, e.g. lr=1e-4 or train.max_steps=20.")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(f"Override {item!r}: value is not a valid YAML scalar ({exc}).") from exc
        *parents, leaf = key.strip().split(".")
        target = data
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UserError(f"Override {item!r}: {part} is not a mapping.")
        target[leaf] = value


# The one numeric validator's bounds for a number without a RANGES entry: any whole number fits in an
# int64 tensor or a seed, any float is finite (inf and nan train to a nan loss, or never end).
DEFAULT_INT_RANGE = (-(2**53), 2**53)


def ranges(cls) -> dict[str, tuple[float | None, float | None]]:
    """{option: (lowest, highest)} of a config class: the `RANGES` of it and every class it derives from
    (None: no bound on that side beyond the defaults; the class's own checks say more there)."""
    merged: dict = {}
    for klass in reversed(cls.__mro__):
        merged.update(vars(klass).get("RANGES", {}))
    return merged


def coerce_types(config, names: typing.Iterable[str] | None = None) -> None:
    """Check each field (or the `names` given) of a config dataclass against its annotation; accept what
    YAML gives for numbers ("1e-4" is a str in YAML 1.1). The one numeric validator: whatever a value
    came from (YAML, an override, a pipeline's section, Python), a float must be finite and every
    number within its class's `RANGES` (`ranges`), so `seed=-1`, `alpha=.inf` or
    `max_steps=1000000000000` are refused in one line before any work."""
    hints = typing.get_type_hints(type(config))
    bounds = ranges(type(config))
    for field in dataclasses.fields(config):
        if names is not None and field.name not in names:
            continue
        value = getattr(config, field.name)
        hint = hints[field.name]
        allowed = typing.get_args(hint) or (hint,)
        if value is None:
            if type(None) not in allowed:
                raise UserError(f"Option {field.name} cannot be null: give a value (default {field.default!r}).")
            continue
        if bool in allowed:
            if not isinstance(value, bool):
                raise UserError(f"Option {field.name} must be true or false, got {value!r}.")
        elif int in allowed:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise UserError(f"Option {field.name} must be a whole number, got {value!r:.80}.")
        elif float in allowed:
            if isinstance(value, bool):
                raise UserError(f"Option {field.name} must be a number, got {value!r}.")
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise UserError(f"Option {field.name} must be a number, got {value!r:.80}.") from None
            if not math.isfinite(value):
                raise UserError(f"Option {field.name} must be a finite number, got {value!r}.")
        elif str in allowed:
            if isinstance(value, (dict, list)):
                raise UserError(f"Option {field.name} must be a string, got {value!r:.80}.")
            value = str(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            default = DEFAULT_INT_RANGE if isinstance(value, int) else (-math.inf, math.inf)
            low, high = bounds.get(field.name, default)
            low, high = default[0] if low is None else low, default[1] if high is None else high
            if not low <= value <= high:
                bound = f"at least {low:g}" if value < low else f"at most {high:g}"
                raise UserError(f"Option {field.name}={value!r:.40} is out of range: it must be {bound} (beyond it a run "
                                "overflows, never ends or means nothing).")
        setattr(config, field.name, value)


def field_docs(cls) -> dict[str, str]:
    """field name -> its `#:` comment in the source of the class (or a dataclass it derives from): the
    one documentation of a config dataclass's options, which `--help` and the templates print."""
    import inspect
    import re

    docs = {}
    # Base classes first, so a subclass's comment on an option it declares again wins (RunConfig).
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        pending = []
        for line in inspect.getsource(klass).splitlines():
            stripped = line.strip()
            if stripped.startswith("#:"):
                pending.append(stripped[2:].strip())
                continue
            match = re.match(r"(\w+)\s*:", stripped)
            if match and pending:
                docs[match.group(1)] = " ".join(pending)
            pending = []
    return docs


def options_help(cls, prefix: str = "") -> str:
    """Every option of a config dataclass with its default and its `#:` documentation, for an
    argparse epilog (RawDescriptionHelpFormatter)."""
    import textwrap

    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if default is None:
            shown = "null"
        elif dataclasses.is_dataclass(default):
            lines.append(f"  {prefix}{f.name} (default as each {prefix}{f.name}.* option below)")
            lines += textwrap.wrap(docs.get(f.name, ""), width=96, initial_indent="      ", subsequent_indent="      ")
            lines.append(options_help(type(default), prefix=f"{prefix}{f.name}."))
            continue
        else:
            shown = default if isinstance(default, str) else json.dumps(default)
        lines.append(f"  {prefix}{f.name} (default {shown})")
        lines += textwrap.wrap(docs.get(f.name, ""), width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


