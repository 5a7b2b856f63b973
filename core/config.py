"""Strict loading of nested frozen dataclass configs from YAML/dicts, with `a.b.c=value` overrides.

An unknown key is an error that lists the valid keys: a misspelt option must never be silently ignored.
A float must be finite: `inf` or `nan` (YAML `.inf`, or an override `lr=inf` that float() accepts) would pass
a range check such as `lr > 0` and surface only later as NaN scores. No config field means "unbounded" by inf:
those that can be switched off take 0 for "none" (`max_minutes`, `max_steps`, `grad_clip`), and budgets
(`memory_budget_mb`) take a large number.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {hint.__name__}, got {value!r}")
        return from_dict(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item is None and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, item or args[i], f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        return _convert(value, hint, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError as e:
            raise ConfigError(f"{where}: must be a finite number, got an integer of {len(str(value))} digits") from e
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "3e-3" (no dot) as a string; accept any float literal Python accepts.
        try:
            value = float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and
                                                not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from `data`, recursively; unknown keys raise ConfigError listing the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def to_dict(config: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a config dict's leaves under the dotted keys that overrides spell."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{key}.{leaf}": v for leaf, v in flatten(value).items()})
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings (values parsed as YAML scalars/lists) to a nested dict, returning a copy."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return out


def load_config(cls: type[T], path: Path | None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls`, updated by the YAML file at `path` (if any), then by the overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} not found") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    merged = _merge(to_dict(cls()), apply_overrides(data, overrides or []))
    return from_dict(cls, merged)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_finite(name: str, value: Any, error: type[ValueError]) -> None:
    # A config built directly (not through from_dict, e.g. from command-line flags) meets its checks here.
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value!r}")


# Range checks of a config's fields, called from its __post_init__: sizes, rates, steps and budgets are checked
# when the config is built, before any job creates a directory. Each raises `error` (ValueError, or the config's
# own subclass of it) naming the first of `names` that is out of range and its value; None ("auto") passes.

def check_choice(value: Any, name: str, choices: Collection[Any], error: type[ValueError] = ValueError) -> None:
    """Raise unless `value` is one of `choices` (a field's or an argument's), naming it and the choices in order."""
    if value not in choices:
        raise error(f"{name}={value!r} is not one of {list(choices)}")


def check_positive(config: Any, *names: str, error: type[ValueError] = ValueError) -> None:
    """Raise for the first of `names` that is not a finite number > 0."""
    for name in names:
        value = getattr(config, name)
        _check_finite(name, value, error)
        if value is not None and not value > 0:
            raise error(f"{name} must be positive, got {value!r}")


def check_non_negative(config: Any, *names: str, error: type[ValueError] = ValueError) -> None:
    """Raise for the first of `names` that is < 0 or not finite (fields where 0 means "none" or "auto": 0, not
    inf, is how they say "no limit")."""
    for name in names:
        value = getattr(config, name)
        _check_finite(name, value, error)
        if value is not None and not value >= 0:
            raise error(f"{name} must not be negative, got {value!r}")


def check_between(config: Any, low: float, high: float, *names: str, exclude_low: bool = False,
                  exclude_high: bool = False, error: type[ValueError] = ValueError) -> None:
    """Raise for the first of `names` outside [low, high]; `exclude_low` / `exclude_high` leave an end out,
    (low, high] or [low, high), and the message writes the interval so."""
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        above = value > low if exclude_low else value >= low
        below = value < high if exclude_high else value <= high
        if not (above and below):  # NaN fails both
            interval = f"{'(' if exclude_low else '['}{low}, {high}{')' if exclude_high else ']'}"
            raise error(f"{name} must lie in {interval}, got {value!r}")


def check_fraction(config: Any, *names: str, error: type[ValueError] = ValueError) -> None:
    """Raise for the first of `names` that is not in [0, 1] (probabilities, mixing weights)."""
    check_between(config, 0, 1, *names, error=error)


def check_integer(config: Any, *names: str, error: type[ValueError] = ValueError) -> None:
    """Raise for the first of `names` that is not an int (a bool is not): for configs built from flags or a
    deployment's arguments, whose types from_dict never converted or checked."""
    for name in names:
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise error(f"{name} must be an integer, got {value!r}")
