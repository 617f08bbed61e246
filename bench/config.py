"""Typed configuration helpers shared by every config dataclass in moe-bench.

Configs are plain dataclasses. This module turns dicts (YAML, CLI ``--set key=value``) into them
with type checks, rejects unknown keys with the list of valid ones, and collects every problem
before raising once (litgpt ``validate_args`` style), so a user fixes all mistakes in one go.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types

from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """One or more invalid configuration values; ``problems`` lists each one."""

    def __init__(self, problems: list[str], context: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {context}:\n{lines}")


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ValueError naming the field."""
    if get_origin(tp) in (Union, types.UnionType):
        if value is None and _is_optional(tp):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is not allowed: expected a finite number")
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{name}={value!r} is not allowed: expected {_describe(tp)}")
    if get_origin(tp) is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        if not isinstance(value, bool) and str(value) in get_args(tp):  # --set precision=32 parses as int
            return str(value)
        raise ValueError(f"{name}={value!r} is not allowed: expected {_describe(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}={value!r} is not allowed: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{name}={value!r} is not allowed: expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}={value!r} is not allowed: expected a number")
        if not math.isfinite(value):  # NaN slips through every `<= 0` check; inf never stops a budget
            raise ValueError(f"{name}={value!r} is not allowed: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r} is not allowed: expected a string")
        return value
    if get_origin(tp) in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}={value!r} is not allowed: expected a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if get_origin(tp) is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}={value!r} is not allowed: expected a mapping")
        return dict(value)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", problems: list[str] | None = None):
    """Build dataclass ``cls`` from ``data``; nested dataclasses come from nested dicts.

    Collects problems into ``problems`` when given (so callers can report everything at once),
    otherwise raises ConfigError.
    """
    own = problems is None
    problems = [] if own else problems
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
        data = {}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            problems.append(
                f"unknown key {prefix + key!r}; valid keys: {', '.join(prefix + k for k in fields)}"
            )
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{prefix}{key}.", problems)
            continue
        nested = _nested_dataclasses(tp, value, prefix + key, problems)
        if nested is not None:
            kwargs[key] = nested
            continue
        try:
            kwargs[key] = coerce(value, tp, prefix + key)
        except ValueError as e:
            problems.append(str(e))
    obj = cls(**kwargs)
    if own:
        problems.extend(check(obj))
        if problems:
            raise ConfigError(problems)
    return obj


def _nested_dataclasses(tp: Any, value: Any, name: str, problems: list[str]) -> Any:
    """``list[D]`` / ``dict[str, D]`` of dataclass D built item by item (problems named
    ``name[i].field`` / ``name.key.field``); None when ``tp`` holds no dataclass."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (list, tuple) and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{name}={value!r} is not allowed: expected a list")
            return []
        return [from_dict(args[0], v, f"{name}[{i}].", problems) for i, v in enumerate(value)]
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        if not isinstance(value, dict):
            problems.append(f"{name}={value!r} is not allowed: expected a mapping")
            return {}
        return {k: from_dict(args[1], v, f"{name}.{k}.", problems) for k, v in value.items()}
    return None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def check(obj: Any, prefix: str = "") -> list[str]:
    """Problems reported by ``obj.problems()`` and by every nested dataclass, dotted names."""
    found = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            found.extend(check(value, f"{prefix}{f.name}."))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    found.extend(check(v, f"{prefix}{f.name}[{i}]."))
        elif isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    found.extend(check(v, f"{prefix}{f.name}.{k}."))
    if hasattr(obj, "problems"):
        found.extend(prefix + p for p in obj.problems())
    return found


def leaf_names(cls_or_obj: Any, prefix: str = "") -> list[str]:
    """Every settable dotted field name, e.g. ``moe.num_experts``."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    hints = get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            names.extend(leaf_names(hints[f.name], f"{prefix}{f.name}."))
        else:
            names.append(prefix + f.name)
    return names


def resolve_key(obj: Any, key: str) -> str:
    """Map a user key to a full dotted name: exact match, else a unique last component."""
    names = leaf_names(obj)
    if key in names:
        return key
    matches = [n for n in names if n.split(".")[-1] == key or n.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise KeyError(f"key {key!r} is ambiguous: it could be {', '.join(matches)}")
    raise KeyError(f"unknown key {key!r}; valid keys: {', '.join(names)}")


_EXPONENT_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; return the number it is meant to be."""
    if isinstance(value, str) and _EXPONENT_NUMBER.match(value.strip()):
        return float(value)
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``'moe.num_experts=8'`` -> ``('moe.num_experts', 8)``; values are parsed as YAML scalars."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return key.strip(), yaml_number(value)


def override_pairs(overrides: dict[str, Any] | list[str], problems: list[str]) -> list[tuple[str, Any]]:
    """``["k=v", ...]`` (CLI) or ``{"k": v}`` -> ``[(k, v), ...]``; malformed items go to ``problems``."""
    if not isinstance(overrides, list):
        return list(overrides.items())
    pairs = []
    for text in overrides:
        try:
            pairs.append(parse_override(text))
        except ValueError as e:
            problems.append(str(e))
    return pairs


def apply_overrides(obj: Any, overrides: dict[str, Any] | list[str], context: str = "config"):
    """Return a copy of dataclass ``obj`` with dotted-key overrides applied and validated."""
    problems: list[str] = []
    pairs = override_pairs(overrides, problems)
    data = to_dict(obj)
    for key, value in pairs:
        try:
            full = resolve_key(obj, key)
        except KeyError as e:
            problems.append(e.args[0])
            continue
        node = data
        *parents, last = full.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    # Build and check even after key errors, so every problem is reported in one go.
    result = from_dict(type(obj), data, problems=problems)
    problems.extend(check(result))
    if problems:
        raise ConfigError(problems, context)
    return result


