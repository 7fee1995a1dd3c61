"""Configs: dataclasses whose fields document every knob; YAML presets; `key=value` overrides.

`load_config(Cls, preset, overrides)` starts from the dataclass defaults, applies a preset
(a name shipped in `editrl/configs/<name>.yaml` or a path to a YAML file), then the
command-line overrides (`lr=3e-4`, `model.channels=[32,64,128]`, dotted keys reach nested
dataclasses). Unknown keys and values of the wrong type are rejected with a message that
names the key and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .session import EditrlInputError

T = TypeVar("T")
PRESETS = Path(__file__).resolve().parent / "configs"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except EditrlInputError as e:
                errors.append(str(e))
        raise EditrlInputError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise EditrlInputError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise EditrlInputError(f"config key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else Any
        return (tuple if origin is tuple else list)(_coerce(v, inner, key) for v in value)
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise EditrlInputError(f"config key '{key}': expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1] if args else Any, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise EditrlInputError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise EditrlInputError(f"config key '{key}': expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise EditrlInputError(f"config key '{key}': expected an integer, got {value!r}") from None
        if f != int(f):
            raise EditrlInputError(f"config key '{key}': expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise EditrlInputError(f"config key '{key}': expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise EditrlInputError(f"config key '{key}': expected a mapping, got {value!r}")
        return _apply(tp(), value, prefix=f"{key}.")
    return value


def _fields(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _apply(obj: T, values: dict[str, Any], prefix: str = "") -> T:
    fields = _fields(obj)
    changes = {}
    for k, v in values.items():
        if k not in fields:
            raise EditrlInputError(f"unknown config key '{prefix}{k}' (valid: {', '.join(sorted(fields))})")
        tp = fields[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            changes[k] = _apply(getattr(obj, k), v, prefix=f"{prefix}{k}.")
        else:
            changes[k] = _coerce(v, tp, prefix + k)
    try:
        return dataclasses.replace(obj, **changes)
    except (ValueError, TypeError) as e:
        raise EditrlInputError(f"invalid config: {e}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['a=1', 'b.c=x'] -> {'a': '1', 'b': {'c': 'x'}} (values stay strings; typed later)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise EditrlInputError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        if not key:
            raise EditrlInputError(f"expected key=value, got {item!r}")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise EditrlInputError(f"config key '{key}' conflicts with another override")
        node[parts[-1]] = value
    return out


def read_preset(preset: str) -> dict[str, Any]:
    p = Path(preset)
    if not p.suffix:
        p = PRESETS / f"{preset}.yaml"
    if not p.is_file():
        names = sorted(x.stem for x in PRESETS.glob("*.yaml"))
        raise EditrlInputError(f"config {preset!r} not found (presets: {', '.join(names)}; or give a YAML path)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise EditrlInputError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EditrlInputError(f"{p}: a config must be a mapping of keys to values")
    return data


def load_config(cls: type[T], preset: str | None = None, overrides: list[str] | dict | None = None) -> T:
    cfg = cls()
    if preset:
        cfg = _apply(cfg, read_preset(preset))
    if overrides:
        cfg = _apply(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
