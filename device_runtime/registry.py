"""Explicit registries: a strategy or codec is registered by name, never discovered.

``register(name, impl)`` adds one; ``get(name)`` returns it or raises an error
that lists the valid names. Nothing registers itself at import time except the
built-ins, which their package's ``__init__`` registers explicitly (by import path,
when ``load`` is to import them only when used).
"""
from __future__ import annotations

import importlib
from typing import Generic, TypeVar

from device_runtime.errors import EXIT_USAGE, DeviceRuntimeError

T = TypeVar("T")


class UnknownNameError(DeviceRuntimeError):
    exit_code = EXIT_USAGE


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, impl: T) -> T:
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        self._items[name] = impl
        return impl

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid: "
                                   f"{', '.join(sorted(self._items)) or 'none'}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def load(self, name: str) -> T:
        """``get``, importing an entry registered as a "module:attribute" path (lazy
        registration) on first use."""
        impl = self.get(name)
        if isinstance(impl, str):
            module, _, attr = impl.partition(":")
            impl = getattr(importlib.import_module(module), attr)
            self._items[name] = impl
        return impl

    def in_order(self) -> list[str]:
        """The names in the order they were registered."""
        return list(self._items)
