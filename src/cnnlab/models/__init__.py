"""Models by name, their summaries and explanations, pretrained weights and freezing.

Owns everything about a network before it meets data: the registry (the leaf `models/_registry.py`,
which model files import), building from a config (`models/build.py`, which imports the model
files), transfer learning, shape arithmetic. May import config, registry and errors; never data,
training, analysis, report or studies. Importing the package itself is light (no torch), so
`cnnlab summary --help` and `cnnlab explain` are fast: the names below load models/build.py on
first use.
"""
from __future__ import annotations

_BUILD = ("MODELS", "ModelConfigError", "build_model", "builder_options", "check_name", "count_params",
          "init_weights")
__all__ = list(_BUILD)


def __getattr__(name: str):
    if name in _BUILD:
        from cnnlab.models import build

        return getattr(build, name)
    raise AttributeError(f"module 'cnnlab.models' has no attribute {name!r}")
