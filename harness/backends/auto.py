"""`backend=auto`: vLLM where it can run (CUDA and vllm importable), else the HF backend.

The `auto` node accepts the keys of both backends (its schema is their union), so one config —
e.g. an experiment preset launched on GPU and CPU hosts alike — validates either way; the chosen
backend receives only its own keys.
"""
from __future__ import annotations

import dataclasses
import typing

from harness.backends.hf import HFBackendConfig
from harness.backends.vllm import VLLMBackendConfig, vllm_available
from harness.registry import register_backend

CANDIDATES = {"hf": HFBackendConfig, "vllm": VLLMBackendConfig}


def _union_config() -> type:
    fields, seen = [("name", str, dataclasses.field(default="auto"))], {"name"}
    for schema in CANDIDATES.values():
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            if f.name not in seen:
                seen.add(f.name)
                fields.append((f.name, hints[f.name], dataclasses.field(default=f.default)))
    return dataclasses.make_dataclass("AutoBackendConfig", fields)


AutoBackendConfig = _union_config()


def choose(device) -> tuple[str, str]:
    """(backend name, why) for this process."""
    if device.type != "cuda":
        return "hf", f"device is {device.type}"
    if not vllm_available():
        return "hf", "vllm is not installed (pip install -e \".[vllm]\")"
    return "vllm", "CUDA and vllm are available"


def keys_for(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(CANDIDATES[name])}


@register_backend("auto")
class AutoBackend:
    """A selector, never instantiated: `harness.pipeline.make_backend` resolves it with `choose`."""
    Config = AutoBackendConfig
