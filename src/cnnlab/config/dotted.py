"""Values as people write them: the YAML loaders (YAML 1.2 numbers, keys given twice refused), `load_yaml`,
`parse_value` for `key=value` on the command line, dotted keys (`set_dotted`, `section`, `flatten`,
`apply_overrides`: the one definition of each), and the alias-bomb guard `check_size`. Imports only
config/schema.py."""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

import yaml

from cnnlab.config.schema import Config, ConfigError


class _Loader(yaml.SafeLoader):
    """`yaml.safe_load` that reads `1e-5` as a number. PyYAML follows YAML 1.1, whose floats need a dot
    (`1.0e-5`), so the value people write would arrive as the text "1e-5", in typed fields, options and
    study grids alike; YAML 1.2 (and everyone) reads a number. Every config value is read through it."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


class _UniqueKeyLoader(_Loader):
    """_Loader that also refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: PyYAML's own error says so
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (lines {first} and "
                                f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, *, unique_keys: bool = False) -> Any:
    """Plain YAML (no Python tags: _Loader is a SafeLoader, only a resolver added) with YAML 1.2 numbers;
    `unique_keys` (config files) also refuses a key given twice in one mapping."""
    loader = (_UniqueKeyLoader if unique_keys else _Loader)(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_value(text: str) -> Any:
    """`key=value` on the command line: the value is read as YAML (`0.1`, `1e-5`, `true`, `[1, 2]`, `null`)."""
    try:
        return load_yaml(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree["a"]["b"] = value for "a.b", making the mappings on the way."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def section(dotted: str) -> type | None:
    """The config dataclass a dotted key names (`train.early_stop` -> EarlyStopConfig), else None."""
    tp: Any = Config
    for part in dotted.split("."):
        tp = typing.get_type_hints(tp).get(part) if dataclasses.is_dataclass(tp) else None
        if not dataclasses.is_dataclass(tp):
            return None
    return tp


def flatten(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested config dict or nested overrides (the inverse of `set_dotted`):
    config sections are opened, a setting whose value is a mapping (model.options, grid) stays whole."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and section(key) is not None:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(tree: dict, overrides: list[str] | dict | None) -> dict:
    if not overrides:
        return tree
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        parsed = []
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override {o!r} is not of the form key=value (e.g. optim.lr=0.05)")
            k, v = o.split("=", 1)
            parsed.append((k.strip(), parse_value(v)))
        items = parsed
    for k, v in items:
        if not k or any(not part for part in k.split(".")):
            raise ConfigError(f"override key {k!r} is not a dotted key such as optim.lr")
        set_dotted(tree, k, v)
    return tree


MAX_NODES = 100_000  # values in a config once YAML aliases are expanded (a real one has a few hundred)


def check_size(tree: Any, where: str = "config") -> None:
    """Refuse a config whose YAML aliases expand past MAX_NODES values (an "alias bomb": a few hundred
    bytes of `&a [*b, *b, ...]` that would take hours and gigabytes to expand) or refer to themselves."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(v: Any) -> int:  # values counted as if every alias were written out, each shared node once
        if not isinstance(v, (dict, list, tuple)):
            return 1
        if id(v) in sizes:
            return sizes[id(v)]
        if id(v) in busy:
            raise ConfigError(f"{where}: a YAML alias refers to the mapping or list that contains it")
        busy.add(id(v))
        n = 1
        for x in (v.values() if isinstance(v, dict) else v):
            n += size(x)
            if n > MAX_NODES:
                raise ConfigError(f"{where}: the config expands to more than {MAX_NODES:,} values once its YAML "
                                  "aliases (*name) are written out; refusing to read it (an alias bomb?)")
        busy.discard(id(v))
        sizes[id(v)] = n
        return n

    size(tree)
