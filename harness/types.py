"""The small interfaces every plugin speaks (see DESIGN.md, "Interfaces")."""
from __future__ import annotations

import contextvars
from collections.abc import MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol


class UserError(Exception):
    """A mistake in what the user asked for. The CLI prints the message, no traceback, and exits 2."""


# ---------------------------------------------------------------- tasks

@dataclass
class Example:
    """One benchmark problem. `id` is stable across runs (it keys samples.jsonl and per-sample seeds)."""
    id: str
    question: Any                       # task-specific payload (text, or dict of fields)
    gold: str                           # reference answer in the task's canonical form
    meta: dict = field(default_factory=dict)   # breakdown keys (subject, level, year, ...)


@dataclass
class Score:
    correct: bool
    parsed: str | None                  # the answer extracted from the completion (None: no answer found)
    truncated: bool = False             # finish_reason == "length": the generation hit its token budget
    extra: dict = field(default_factory=dict)   # anything worth recording per sample
    # Two verdicts (harness/scoring.py): `correct`/`parsed` are lighteval-compatible (the whole completion
    # searched, as the papers graded); `correct_strict`/`parsed_strict` only read the answer after the last
    # </think> and count unfinished reasoning as wrong. None: the task has a single rule (both equal).
    correct_strict: Optional[bool] = None
    parsed_strict: str | None = None
    unfinished: bool = False            # a thinking prompt/completion that never closed </think>


class Task(Protocol):
    name: str

    def examples(self) -> list[Example]: ...

    def prompt(self, ex: Example) -> list[dict] | str: ...   # chat messages, or a raw string

    def score(self, ex: Example, completion: str, finish_reason: str = "stop") -> Score: ...


# ---------------------------------------------------------------- generation

@dataclass
class Sampling:
    n: int = 1
    temperature: float = 0.0            # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    max_new_tokens: int = 256
    seed: int = 0
    # Cap on prompt + generated tokens (vLLM's max_model_len; QRM runs 32768). Backends give each row
    # min(max_new_tokens, max_model_len - prompt tokens) new tokens; None: no cap beyond max_new_tokens.
    max_model_len: Optional[int] = None


@dataclass
class Completion:
    text: str
    n_tokens: int
    finish_reason: str                  # "stop" | "length"


class Backend(Protocol):
    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[list[int]] | None = None,
                 on_sample=None) -> list[list[Completion]]: ...   # on_sample(i, j, completion) as each finishes


# ---------------------------------------------------------------- quantization

@dataclass
class QuantizedLinear:
    """What the exporter needs for one linear: integer codes and the grid they live on."""
    codes: Any          # uint8 tensor [out, in], values in [0, 2^bits - 1]
    scale: Any          # float tensor [out, n_groups]
    zero: Any           # integer-valued tensor [out, n_groups], unsigned convention
    bits: int
    group_size: int     # -1 = per output channel
    sym: bool


_SPILL_DIR: contextvars.ContextVar = contextvars.ContextVar("rqbench_spill_dir", default=None)


@contextmanager
def spill_layers(directory):
    """QuantResults created inside this block keep each layer's codes in a file under `directory` (None: in RAM).

    A method holds the uint8 codes of every quantized layer until the export (~1 byte per weight: ~70 GB
    for a 70B model); spilled, host memory no longer grows with depth and the export reads one layer at a time."""
    token = _SPILL_DIR.set(None if directory is None else str(directory))
    try:
        yield
    finally:
        _SPILL_DIR.reset(token)


class SpilledLayers(MutableMapping):
    """QuantResult.layers whose QuantizedLinear entries live in files (one per layer), read back on access."""

    def __init__(self, directory):
        import uuid
        self.dir = Path(directory) / uuid.uuid4().hex[:12]
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, Path] = {}
        self._numel: dict[str, int] = {}

    def __setitem__(self, name: str, q: "QuantizedLinear") -> None:
        import torch
        path = self._files.get(name) or self.dir / f"{len(self._files):06d}.pt"
        torch.save({"codes": q.codes, "scale": q.scale, "zero": q.zero, "bits": q.bits,
                    "group_size": q.group_size, "sym": q.sym}, path)
        self._files[name], self._numel[name] = path, int(q.codes.numel())

    def __getitem__(self, name: str) -> "QuantizedLinear":
        import torch
        return QuantizedLinear(**torch.load(self._files[name], weights_only=True))

    def __delitem__(self, name: str) -> None:
        self._files.pop(name).unlink(missing_ok=True)
        del self._numel[name]

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def numel(self, name: str) -> int:
        return self._numel[name]


def _new_layers():
    d = _SPILL_DIR.get()
    return {} if d is None else SpilledLayers(d)


@dataclass
class QuantResult:
    # module name -> codes; under `spill_layers(dir)` a SpilledLayers (same mapping interface, codes on disk)
    layers: MutableMapping = field(default_factory=_new_layers)
    info: dict = field(default_factory=dict)                             # method-specific log
    # Weight-activation methods: the input-activation spec (harness.quant.actquant.ActSpec.to_dict() plus
    # "targets", the linears whose inputs are fake-quantized); None: weight-only.
    activations: Optional[dict] = None


class Method(Protocol):
    name: str

    def quantize(self, model, ctx) -> QuantResult: ...


def check_values(prefix: str, obj, checks, get=getattr) -> None:
    """Raise a UserError for the first failing (key, ok, allowed) check, naming `prefix.key`, its value and what is allowed."""
    for key, ok, allowed in checks:
        if not ok:
            raise UserError(f"{prefix}.{key}={get(obj, key)!r} is not allowed; allowed: {allowed}")
