"""Name -> plugin class, for methods, tasks and backends.

A plugin is one module whose file name is its registered name (methods/gptq.py registers "gptq"),
so lookup imports the module on demand and `available()` lists the files: adding a plugin never
touches this file.
"""
from __future__ import annotations

import importlib
import pkgutil

from harness.types import UserError

_KINDS = {"method": "methods", "task": "tasks", "backend": "harness.backends"}
_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in _KINDS}


def _register(kind: str, name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[kind][name] = cls
        return cls
    return deco


def register_method(name: str):
    return _register("method", name)


def register_task(name: str):
    return _register("task", name)


def register_backend(name: str):
    return _register("backend", name)


def available(kind: str) -> list[str]:
    pkg = importlib.import_module(_KINDS[kind])
    found = {m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")}
    return sorted(found | set(_REGISTRY[kind]))


def get(kind: str, name: str) -> type:
    if name not in _REGISTRY[kind]:
        allowed = available(kind)
        if name not in allowed:
            raise UserError(f"{kind}.name={name!r} is not a known {kind}; allowed: {', '.join(allowed)}")
        importlib.import_module(f"{_KINDS[kind]}.{name}")
        if name not in _REGISTRY[kind]:
            raise UserError(f"module {_KINDS[kind]}.{name} does not register a {kind} named {name!r}")
    return _REGISTRY[kind][name]
