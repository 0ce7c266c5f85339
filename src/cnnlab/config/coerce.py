"""Building the config dataclasses from plain dicts (`build`), with type checks that name the key, every problem
found at once, and "did you mean" for unknown keys; `to_dict`, the way back. Imports only config/schema.py."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal

from cnnlab.config.schema import Config, ConfigError


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(value, float) and not math.isfinite(value):  # .inf / .nan: every number here is finite
        raise ConfigError(f"{key}={value!r}: must be a finite number")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: must not be empty (null)")
        errors = []
        # try bool/int before float so that 5000 stays an int count
        for opt in sorted((o for o in options if o is not type(None)), key=lambda o: o is float):
            try:
                return _coerce(value, opt, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # one type besides null (`X | None`): its own message (a Literal's choices)
            raise errors[0]
        names = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if all(isinstance(c, str) for c in choices):
            value = _coerce(value, str, key)  # `amp: off` (YAML 1.1 reads a boolean) means "off"
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}.{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return build(tp, value, key)
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, args[i] if args and args[-1] is not Ellipsis else item_tp, f"{key}[{i}]")
                     for i, v in enumerate(value))
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and tp is int and abs(value) >= 1:
            return int(value)
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # a number given as text: "0.5", "1e-5"
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads `off` / `on` as booleans: `amp: off` means "off"
            return "on" if value else "off"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected text, got {value!r}")
    return value


def _all_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config (`optim.lr`, `train.early_stop.patience`, ...)."""
    cls = cls or Config
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        out += _all_keys(tp, key + ".") if dataclasses.is_dataclass(tp) else [key]
    return out


def _unknown_key(key: str, k: str, prefix: str, names: list[str]) -> str:
    # a key that exists as it is in another section (`epochs` for train.epochs, `lr` for optim.lr) beats a
    # spelling near a sibling (`epochs` ~ `search`); then a misspelt sibling; then a misspelt key anywhere
    leaf = str(key).split(".")[-1]
    full = _all_keys()
    same = [x for x in full if x.split(".")[-1] == leaf and x != key]
    close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
    if same:
        hint = f" Did you mean {' or '.join(repr(x) for x in same[:3])}?"
    elif close:
        hint = f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?"
    else:
        near = [x for x in full if difflib.get_close_matches(leaf, [x.split(".")[-1]], cutoff=0.8)]
        hint = f" Did you mean {' or '.join(repr(x) for x in near[:3])}?" if near else ""
    return f"unknown key {key!r}.{hint} Known keys here: {', '.join(names)}."


def build(cls: type, data: dict, prefix: str = "", problems: list | None = None) -> Any:
    """`cls` from `data`, every problem found (not only the first): raised together as one ConfigError
    whose `problems` lists (key, message) pairs."""
    top = problems is None
    problems = [] if top else problems
    before = len(problems)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            problems.append((key, _unknown_key(key, k, prefix, names)))
            continue
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            kwargs[k] = build(hints[k], v, key, problems)
            continue
        try:
            kwargs[k] = _coerce(v, hints[k], key)
        except ConfigError as e:
            problems.append((key, str(e)))
    if top and problems:
        raise _many(problems)
    return cls(**kwargs) if len(problems) == before else None


def _many(problems: list[tuple[str, str]]) -> ConfigError:
    text = problems[0][1] if len(problems) == 1 else \
        f"{len(problems)} problems:\n  " + "\n  ".join(m for _, m in problems)
    e = ConfigError(text)
    e.problems = problems
    return e


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists for tuples) of a config, for YAML and JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)
