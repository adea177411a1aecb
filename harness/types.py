"""The small interfaces every plugin speaks (see DESIGN.md, "Interfaces")."""
from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class QuantResult:
    layers: dict[str, QuantizedLinear] = field(default_factory=dict)   # module name -> codes
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
