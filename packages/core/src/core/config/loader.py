"""Typed configs: dataclasses with a docstring under every field, YAML presets, ``key=value``
overrides.

A config is a tree of dataclasses. Values come, in this order, from the dataclass defaults, a
YAML preset (a partial tree), and ``key=value`` overrides on the command line (values are parsed
as YAML, so ``trainer.max_steps=100``, ``optim.betas=[0.9,0.95]`` and ``run.dir=null`` work).
Every value is checked against the field's type; an unknown key names the closest valid key.

Field documentation is the string literal written under each field (as in litgpt)::

    @dataclass
    class OptimConfig:
        lr: float = 3e-4
        \"\"\"Peak learning rate.\"\"\"

:func:`field_docs` reads those strings from the source, so ``--help`` and the tests can list them.

Self-check: ``python -m core.config.loader``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from core.errors import ConfigError

C = TypeVar("C")


# --------------------------------------------------------------------------------------------
# Reading documentation and keys
# --------------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under the fields of a dataclass (and of its dataclass bases).

    Args:
        cls: a dataclass type.

    Returns:
        ``{field name: docstring}`` for every field that has one.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (e.g. defined in a REPL)
            continue
        tree = ast.parse(source)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (works with ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def iter_keys(cls: type, prefix: str = "") -> Iterable[tuple[str, Any, str]]:
    """Every leaf key of a config class, depth first.

    Args:
        cls: a dataclass type.
        prefix: dotted prefix added to each key.

    Yields:
        ``(dotted key, type, docstring)`` for each leaf field.
    """
    docs = field_docs(cls)
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            yield from iter_keys(tp, key + ".")
        else:
            yield key, tp, docs.get(f.name, "")


def type_name(tp: Any) -> str:
    """A short human name for a type annotation, e.g. ``int | None`` or ``one of 'a', 'b'``."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, Sequence, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return "mapping"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return "path"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------------------------
# Type checking and coercion
# --------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """Internal: a value does not fit a type (the message says why)."""


def _coerce(value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp`` and convert where it is lossless.

    Args:
        value: a value parsed from YAML or given in Python.
        tp: the field's type annotation.

    Returns:
        The value, converted (``str`` -> ``Path``, ``int`` -> ``float``, list -> tuple, ...).

    Raises:
        _Mismatch: when the value cannot be of that type.
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch("expected null")
    if origin is Literal:
        return _coerce_literal(value, tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp)
    if _is_dataclass_type(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch(f"expected a mapping of {tp.__name__} keys")
        return value  # handled by from_dict
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        return _coerce_sequence(value, tp)
    if origin in (dict, Mapping) or tp is dict:
        return _coerce_mapping(value, tp)
    if isinstance(tp, type) and tp in _SCALARS:
        return _SCALARS[tp](value)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return Path(value)
        raise _Mismatch("expected a path")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch(f"expected {tp.__name__}")
    return value


def _coerce_literal(value: Any, tp: Any) -> Any:
    """``value`` as one of the choices of ``Literal[...]`` annotation ``tp``."""
    choices = get_args(tp)
    for choice in choices:
        # YAML may read `auto` as str and `1` as int; compare as given and as strings.
        if value == choice and type(value) is type(choice):
            return choice
    for choice in choices:
        if isinstance(choice, str) and str(value) == choice and not isinstance(value, bool):
            return choice
    raise _Mismatch(f"expected one of {', '.join(repr(c) for c in choices)}")


def _coerce_union(value: Any, tp: Any) -> Any:
    """``value`` as the first member of union ``tp`` that takes it (``None`` for an optional)."""
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise _Mismatch(f"expected {type_name(tp)}, not null")
    # Try exact-type members first so that `1` stays an int in `int | str`.
    ordered = sorted(args, key=lambda a: 0 if isinstance(a, type) and type(value) is a else 1)
    for arg in ordered:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg)
        except _Mismatch:
            pass
    raise _Mismatch(f"expected {type_name(tp)}")


def _coerce_sequence(value: Any, tp: Any) -> list[Any] | tuple[Any, ...]:
    """``value`` (any non-string iterable) as a list, or a tuple for a tuple annotation."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _Mismatch(f"expected {type_name(tp)}, e.g. [a, b]")
    args = [a for a in get_args(tp) if a is not Ellipsis]
    items = [_coerce(v, args[0]) if args else v for v in value]
    return tuple(items) if (get_origin(tp) is tuple or tp is tuple) else items


def _coerce_mapping(value: Any, tp: Any) -> dict[Any, Any]:
    """``value`` as a dict, keys and values coerced when ``tp`` names their types."""
    if not isinstance(value, Mapping):
        raise _Mismatch("expected a mapping")
    args = get_args(tp)
    if len(args) == 2:
        return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
    return dict(value)


def _coerce_bool(value: Any) -> bool:
    """A boolean, or one of the words true/false, yes/no, on/off (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return value.lower() in ("true", "yes", "on")
    raise _Mismatch("expected true or false")


def _coerce_int(value: Any) -> int:
    """An int, a whole float, or a text of one (``1_000``, ``1e3``); never a boolean."""
    if isinstance(value, bool):
        raise _Mismatch("expected an integer, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                pass
            else:
                if as_float.is_integer():
                    return int(as_float)
    raise _Mismatch("expected an integer")


def _coerce_float(value: Any) -> float:
    """A number or the text of one as a float; never a boolean."""
    if isinstance(value, bool):
        raise _Mismatch("expected a number, not a boolean")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    raise _Mismatch("expected a number")


def _coerce_str(value: Any) -> str:
    """A string, or a number written as one (YAML reads ``name: 1`` as an int)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _Mismatch("expected a string")


# The scalar annotations and their coercions (looked up by the annotation itself).
_SCALARS: dict[Any, Any] = {
    bool: _coerce_bool,
    int: _coerce_int,
    float: _coerce_float,
    str: _coerce_str,
}


def _close_key(key: str, valid: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest valid key, or an empty string."""
    valid = list(valid)
    leaf = key.rsplit(".", 1)[-1]
    # A right leaf under a wrong group (`optim.max_steps`) first, then the nearest spelling.
    matches = [v for v in valid if v.rsplit(".", 1)[-1] == leaf and v != key][:1]
    matches = matches or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean '{matches[0]}'?" if matches else ""


def from_dict(
    cls: type[C], data: Mapping[str, Any] | None, prefix: str = "", root: type | None = None
) -> C:
    """Build a config dataclass from a (partial) nested mapping, checking every key and value.

    Args:
        cls: the dataclass type.
        data: nested mapping; missing keys keep their defaults.
        prefix: dotted location of ``data`` (for error messages).
        root: the root config class (suggestions for unknown keys come from all of its keys).

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: unknown key (with the closest valid key) or a value of the wrong type.
    """
    data = dict(data or {})
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in names]
    retired = getattr(cls, "RETIRED", {})
    for name in unknown:
        if name in retired:
            raise ConfigError(f"Config key '{prefix}{name}' is gone: {retired[name]}.")
    if unknown:
        key = f"{prefix}{unknown[0]}"
        valid = (
            [k for k, _, _ in iter_keys(root or cls)]
            if root
            else [k for k, _, _ in iter_keys(cls, prefix)]
        )
        raise ConfigError(f"Unknown config key '{key}'.{_close_key(key, valid)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if _is_dataclass_type(tp):
            if isinstance(value, tp):
                kwargs[name] = value
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"Config key '{key}' is a group of settings; set its keys instead, "
                    f"e.g. '{next(iter_keys(tp, key + '.'))[0]}=...'."
                )
            kwargs[name] = from_dict(tp, value, key + ".", root or cls)
            continue
        try:
            kwargs[name] = _coerce(value, tp)
        except _Mismatch as err:
            raise ConfigError(
                f"Config key '{key}' got {value!r} ({type(value).__name__}): {err}."
            ) from None
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Config group '{prefix.rstrip('.') or cls.__name__}': {err}") from None


def to_dict(cfg: Any) -> Any:
    """A config as plain YAML-able data (``Path`` -> ``str``, tuples -> lists).

    Args:
        cfg: a config dataclass instance (or any nested value inside one).

    Returns:
        Nested dicts, lists and scalars.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, PurePath):
        return str(cfg)
    return cfg


def to_yaml(cfg: Any) -> str:
    """A config as YAML text, keys in field order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------
# Presets and overrides
# --------------------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (mappings merge, other values
    replace)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping.

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping at the top.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Config file '{path}' is not UTF-8 text.") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"Config file '{path}' must hold a mapping of keys at the top level.")
    return dict(data)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[x, y]"]`` into a nested mapping, values parsed as YAML.

    Raises:
        ConfigError: an item without ``=`` or with an empty key.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise ConfigError(
                f"Override '{item}' is not of the form key=value (e.g. trainer.max_steps=100)."
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # e.g. a path with a colon: keep the text as given
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            existing = node.setdefault(part, {})
            if not isinstance(existing, dict):
                raise ConfigError(
                    f"Override '{item}' conflicts with an earlier override of '{part}'."
                )
            node = existing
        node[parts[-1]] = value
    return tree


def load_config(
    cls: type[C],
    preset: str | Path | None = None,
    overrides: Sequence[str] = (),
    presets_dir: Path | None = None,
) -> C:
    """Build a config from defaults, an optional preset and ``key=value`` overrides.

    Args:
        cls: the root config dataclass of the task.
        preset: a preset name (a ``<name>.yaml`` in ``presets_dir``) or a path to a YAML file.
        overrides: ``key=value`` strings; they win over the preset.
        presets_dir: the folder of the package's shipped presets.

    Returns:
        The validated config.

    Raises:
        ConfigError: unknown preset, unknown key, wrong type, or a failed range check.
    """
    data: dict[str, Any] = {}
    if preset is not None:
        data = read_yaml(resolve_preset(preset, presets_dir))
    data = _deep_merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def list_presets(presets_dir: Path | None) -> list[str]:
    """Names of the YAML presets shipped in ``presets_dir`` (sorted)."""
    if presets_dir is None or not Path(presets_dir).is_dir():
        return []
    return sorted(p.stem for p in Path(presets_dir).glob("*.yaml"))


def resolve_preset(preset: str | Path, presets_dir: Path | None) -> Path:
    """The YAML file behind a preset name or path.

    Raises:
        ConfigError: neither a shipped preset nor an existing file.
    """
    text = str(preset)
    if presets_dir is not None and (Path(presets_dir) / f"{text}.yaml").is_file():
        return Path(presets_dir) / f"{text}.yaml"
    path = Path(text)
    if path.is_file():
        return path
    names = list_presets(presets_dir)
    if path.suffix in (".yaml", ".yml") or "/" in text or "\\" in text:
        raise ConfigError(
            f"Config file '{path}' does not exist. Presets of this package: "
            f"{', '.join(names) or '(none)'}."
        )
    hint = _close_key(text, names)
    raise ConfigError(
        f"Unknown preset '{text}': it is neither a preset of this package nor a YAML file."
        f"{hint} Presets: {', '.join(names) or '(none)'}."
    )


def describe_keys(cls: type, width: int = 100) -> str:
    """All keys of a config class with type, default and docstring, for ``--help``.

    Returns:
        Text with one block per key.
    """
    defaults = to_dict(cls())
    lines = []
    for key, tp, doc in iter_keys(cls):
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        head = (
            f"  {key} ({type_name(tp)}, default "
            f"{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()})"
        )
        lines.append(head)
        if doc:
            lines.extend(
                textwrap.wrap(doc, width=width, initial_indent="      ", subsequent_indent="      ")
            )
    return "\n".join(lines)


if __name__ == "__main__":  # self-check: python -m core.config.loader

    @dataclasses.dataclass
    class _Inner:
        lr: float = 1e-3
        """Learning rate."""
        betas: tuple[float, float] = (0.9, 0.999)
        """Adam betas."""

    @dataclasses.dataclass
    class _Root:
        name: str = "x"
        """A name."""
        devices: int | str = 1
        """Device count or 'auto'."""
        mode: Literal["min", "max"] = "min"
        """Direction."""
        inner: _Inner = dataclasses.field(default_factory=_Inner)
        """Nested group."""

    cfg = load_config(_Root, overrides=["inner.lr=1e-4", "devices=auto", "inner.betas=[0.8, 0.9]"])
    assert cfg.inner.lr == 1e-4 and cfg.devices == "auto" and cfg.inner.betas == (0.8, 0.9)
    try:
        load_config(_Root, overrides=["inner.lrr=1"])
    except ConfigError as err:
        assert "inner.lr" in str(err), err
        print("unknown key ->", err)
    try:
        load_config(_Root, overrides=["mode=median"])
    except ConfigError as err:
        print("bad value  ->", err)
    print(describe_keys(_Root))
    print(to_yaml(cfg))
    print("core.config.loader: ok")
