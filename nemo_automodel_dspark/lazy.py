"""Lazy re-exports for package `__init__`s: a name's module is imported on first use, so importing a package
(the root, `loss`, `tools`) does not import torch or anything else those modules need."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The module `__getattr__` of `package`: `name` → `exports[name]` (a module path) imported, then its `name`."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
