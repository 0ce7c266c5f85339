"""Name -> builder registries with "did you mean" errors (timm's `@register_model` idea, one class)."""
from __future__ import annotations

import difflib
from typing import Callable, Iterator

from cnnlab.errors import InputError


class UnknownNameError(InputError, KeyError, ValueError):
    """An unknown name was asked of a registry; the message offers the closest names (exit 2)."""


class Registry:
    """A named collection of builder functions.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("lenet5")
    ... def lenet5(*, num_classes=10): ...
    """

    def __init__(self, kind: str, elsewhere: Callable[[str], list[str]] | None = None):
        self.kind = kind
        self._items: dict[str, Callable] = {}
        self.elsewhere = elsewhere  # name -> the spellings that reach it outside the registry ('torchvision:x')

    def register(self, name: str | None = None) -> Callable[[Callable], Callable]:
        def deco(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable:
        if name in self._items:
            return self._items[name]
        raise UnknownNameError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._items), n=3, cutoff=0.5)
        close = (self.elsewhere(str(name)) if self.elsewhere else []) + close
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._items))}."

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
