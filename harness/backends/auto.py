"""`backend=auto`: vLLM where it can run (CUDA and vllm importable) and can serve the run's checkpoint, else HF.

The `auto` node accepts the keys of both backends (its schema is their union), so one config —
e.g. an experiment preset launched on GPU and CPU hosts alike — validates either way; the chosen
backend receives only its own keys.
"""
from __future__ import annotations

import dataclasses
import typing

from harness.backends.hf import HFBackendConfig
from harness.backends.vllm import VLLMBackendConfig, packed_problems, vllm_available
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


def environment(device) -> tuple[str, str]:
    """(backend name, why) for this process: can vLLM run here at all?"""
    if device.type != "cuda":
        return "hf", f"device is {device.type}"
    if not vllm_available():
        return "hf", "vllm is not installed (pip install -e \".[vllm]\")"
    return "vllm", "CUDA and vllm are available"


def choose(device, act=None, checkpoint=None) -> tuple[str, str]:
    """(backend name, why) for this run: vLLM where it runs and can serve what the run made, else HF.

    act: the run's activation spec (fake activation quantization runs only in HF); checkpoint: the
    directory vLLM would load (a packed one it cannot serve goes to HF)."""
    if act is not None:
        return "hf", f"activations are fake-quantized to {act.bits} bits"
    name, why = environment(device)
    if name == "vllm" and checkpoint is not None:
        problems = packed_problems(checkpoint)
        if problems:
            return "hf", f"vLLM cannot serve this packed checkpoint: {problems[0]}"
    return name, why


def keys_for(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(CANDIDATES[name])}


@register_backend("auto")
class AutoBackend:
    """A selector, never instantiated: `harness.pipeline.make_backend` resolves it with `choose`."""
    Config = AutoBackendConfig
