"""Name -> factory registries with lazy imports and one clear error for unknown names."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class UnknownNameError(ValueError):
    """An unknown model, reward, prompt set, method or grid name."""

    def __init__(self, kind: str, name: object, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, list(valid)
        super().__init__(f"unknown {kind} {name!r}; available: {', '.join(self.valid)}")


class Registry:
    """Maps names to factories; a factory may be given as a lazy "module:attr" string so that heavy
    optional dependencies are imported only when that entry is used."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, target: Any = None) -> Callable:
        if target is not None:
            self._entries[name] = target
            return target

        def decorator(obj):
            self._entries[name] = obj
            return obj

        return decorator

    def check(self, name: str) -> str:
        """Validate a name without importing anything; returns it."""
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, self.names())
        return name

    def get(self, name: str) -> Any:
        target = self._entries[self.check(name)]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[name] = target
        return target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
