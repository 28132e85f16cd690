"""Name -> implementation registries (backends, OpSets, objectives), with lazy "module:attr" entries.

Lazy entries keep optional dependencies (DeepSpeed, Megatron, triton, torch_npu) unimported until their
implementation is asked for; a new implementation is one file plus one `register` line.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


class Registry:
    """`what` names the thing in errors ("backend", "OpSet", "train.objective")."""

    def __init__(self, what: str, entries: dict[str, str | Callable[..., Any]]) -> None:
        self.what = what
        self._entries = dict(entries)

    def register(self, name: str, factory: str | Callable[..., Any]) -> None:
        """Register `factory` (a callable, or a lazy "module:attr" string) under `name`; replaces an entry."""
        self._entries[name] = factory

    def names(self) -> list[str]:
        return sorted(self._entries)

    def in_order(self) -> list[str]:
        """The names in registration order (e.g. the stages in recipe order)."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered as `name`, imported on first use."""
        if name not in self._entries:
            raise KeyError(f"{self.what} {name!r} is not registered; available: {', '.join(self.names())}")
        factory = self._entries[name]
        if isinstance(factory, str):
            module, attr = factory.split(":")
            factory = self._entries[name] = getattr(importlib.import_module(module), attr)
        return factory
