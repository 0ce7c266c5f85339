"""Typed, frozen experiment configuration: YAML in, dotted `key=value` overrides, validation up front.

Every mistake in a value fails here, before any work starts, with a `ConfigError` that names the key
and the value (the CLI turns it into exit code 2). A leaf package: its modules import no other cnnlab
module but errors.py, and one another in one direction only (schema <- coerce, dotted <- checks <- this
file). Names from the registries (data.name, model.name) are checked where data sets and models are built.

This file is the public face (`load`, `from_dict`, `read_yaml`, `replace`, `dump_yaml`, `expand_user`) and
re-exports every public name of the package, so `from cnnlab import config as C; C.Config, C.flatten, ...`
reach them here; each concern has one owner:
  schema.py  the dataclasses, the `Literal` choices, shared limits, SearchConfig, ConfigError
  coerce.py  dataclasses from plain dicts with type checks that name the key; `to_dict`
  dotted.py  YAML loaders, `parse_value`, dotted keys (`set_dotted`, `section`, `flatten`, `apply_overrides`)
  checks.py  `validate` (value checks beyond types), optimizer names, `search_config`, `tta_mode`
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path

import yaml

from cnnlab.config.checks import (UNSUPPORTED_OPTIMIZERS, search_config, torch_optimizers, tta_mode,
                                  validate)
from cnnlab.config.coerce import build as _build
from cnnlab.config.coerce import to_dict
from cnnlab.config.dotted import (MAX_NODES, apply_overrides, check_size, flatten, load_yaml, parse_value,
                                  section, set_dotted)
from cnnlab.config.schema import (EPOCH_METRICS, MAX_IMAGE_SIDE, SPACE_KINDS, Amp, Anneal, AugmentConfig,
                                  AutoAugmentPolicy, ClassWeights, ClipConfig, Config, ConfigError, DataConfig,
                                  Direction, EarlyStopConfig, InitScheme, LoaderKind, ModelConfig, Monitor,
                                  OptimConfig, OptimName, OutputConfig, PaddingMode, Progress, PrunerName,
                                  RandAugmentConfig, ResizedCropConfig, ResizeMode, Sampler, SamplerName,
                                  ScheduleConfig, ScheduleName, SearchConfig, Switch, TrainConfig, TtaMode, ValFrom)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = load_yaml(path.read_text(encoding="utf-8"), unique_keys=True)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "save the config as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML (only plain YAML is read, no Python tags): {e}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, model:, ...)")
    return tree


_KEY = re.compile(r"^(?:unknown key )?'?([A-Za-z_][\w.]*)")


def from_dict(tree: dict, *, where: str = "config", overridden: tuple[str, ...] = ()) -> Config:
    """A validated Config; errors name `where` (the file), or the command line for the keys in
    `overridden` (the dotted keys that overrides set)."""
    check_size(tree, where)
    try:
        cfg = _build(Config, tree)
        validate(cfg)
    except ConfigError as e:
        problems = getattr(e, "problems", None) or [((_KEY.match(str(e)) or [None, ""])[1], str(e))]

        def blamed(key: str) -> str:
            if any(key == o or key.startswith(o + ".") or o.startswith(key + ".") for o in overridden):
                return "command line"
            return where

        places = {blamed(k) for k, _ in problems}
        if len(places) == 1:
            raise ConfigError(f"{places.pop()}: {e}") from None
        raise ConfigError(f"{len(problems)} problems:\n  " + "\n  ".join(f"{blamed(k)}: {m}" for k, m in problems)) from None
    return cfg


def load(source: str | Path | dict | Config | None = None, overrides: list[str] | dict | None = None) -> Config:
    """A Config from a YAML path, a dict or a Config, with dotted overrides applied."""
    if isinstance(source, Config):
        tree, where = to_dict(source), "config"
    elif isinstance(source, dict):
        tree, where = dict(source), "config"
    elif source is None:
        tree, where = {}, "config"
    else:
        tree, where = read_yaml(source), str(source)
        tree.setdefault("output", {})
        if isinstance(tree["output"], dict):
            tree["output"].setdefault("name", Path(source).stem)
    tree = apply_overrides(copy.deepcopy(tree), overrides)
    keys = tuple(overrides) if isinstance(overrides, dict) else tuple(o.split("=", 1)[0].strip() for o in overrides or ())
    return expand_user(from_dict(tree, where=where, overridden=keys if where != "config" else ()))


def expand_user(cfg: Config) -> Config:
    """`~` and `~user` in output.dir and data.root mean a home folder, as in a shell (never a folder named '~')."""
    root = os.path.expanduser(cfg.data.root) if cfg.data.root else cfg.data.root
    out = os.path.expanduser(cfg.output.dir)
    if root == cfg.data.root and out == cfg.output.dir:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root),
                               output=dataclasses.replace(cfg.output, dir=out))


def replace(cfg: Config, overrides: dict | list[str]) -> Config:
    """A new Config with dotted overrides applied (validated)."""
    return load(cfg, overrides)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
