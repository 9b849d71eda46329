"""Builds the typed config tree from defaults, a YAML file and dotted command-line overrides.

A small hand-written loader rather than omegaconf: we want errors that name the bad key *and* the nearest
valid one (difflib), strict types without omegaconf's string coercions, and dataclasses that validate
themselves in ``__post_init__`` exactly as when built in Python.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from typing import Any

import yaml


# dataclass -> function(raw mapping, base or None) -> base instance; lets a section start from a named preset
# (the model flavor) before the YAML refines it.
BASE_HOOKS: dict[type, Any] = {}


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what to do."""


def _closest(name: str, valid: list[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, base: Any, path: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and builds nested dataclasses; returns the typed
    value."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return build(tp, value, base=base, path=path)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], base, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, None, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(v, val_tp, None, f"{path}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in choices:
            return str(value)  # YAML reads `zero_stage: 3` as an int; the choice is the string "3"
        match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
        hint = f"; did you mean '{match[0]}'?" if match else ""
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, choices))}{hint}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            return float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string; for a float field it is a number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads "run.name=123" as an int; a name may be numeric
    else:
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def build(cls: type, raw: dict[str, Any], *, base: Any = None, path: str = "") -> Any:
    """Builds dataclass ``cls`` from the mapping ``raw`` on top of ``base`` (an instance, or the defaults)."""
    hook = BASE_HOOKS.get(cls)
    if hook is not None:
        base = hook(raw, base)  # e.g. a model flavor supplies the defaults the YAML then refines
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        where = f"{path}.{key}" if path else key
        raise ConfigError(f"unknown config key '{where}'"
                          f"{_closest(key, list(fields), f'{path}.' if path else '')}")
    kwargs = {}
    for name, field in fields.items():
        sub = f"{path}.{name}" if path else name
        base_val = getattr(base, name) if base is not None else _default(field)
        if name in raw:
            nested_base = base_val if dataclasses.is_dataclass(base_val) else None
            kwargs[name] = _convert(raw[name], hints[name], nested_base, sub)
        else:
            kwargs[name] = base_val
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from None


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Splits ``a.b.c=value`` into its key path and a YAML-typed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.path=value (e.g. model.fusion.layers=2)")
    key, value = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{text}' has an empty key")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def _set_path(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def merge_raw(yaml_text: str | None, overrides: list[str]) -> dict[str, Any]:
    """Returns the raw mapping of a YAML document with the dotted overrides applied on top."""
    tree = yaml.safe_load(yaml_text) if yaml_text else {}
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError("the config file must hold a mapping at its top level")
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(tree, keys, value)
    return tree


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens nested mappings to dotted keys (MLflow params); lists become JSON strings."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, dict)):
            flat[name] = json.dumps(value, sort_keys=True)
        else:
            flat[name] = value
    return flat


def digest(tree: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]
