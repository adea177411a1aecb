"""The toy's synthetic multi-step reasoning task: chained integer addition/subtraction.

An answer needs the chain of thought (one partial result per line), which is what makes a
4-layer model's accuracy sensitive to quantization. The generator is seeded; the held-out split
is disjoint from training by construction (a problem's split is a hash of its text).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

MIN_TERMS, MAX_TERMS = 3, 5
MAX_OPERAND = 99
INSTRUCTION = "Compute: "


@dataclass(frozen=True)
class ArithProblem:
    terms: tuple[int, ...]
    ops: tuple[str, ...]          # len(terms) - 1 of "+" / "-"

    @property
    def expression(self) -> str:
        out = str(self.terms[0])
        for op, t in zip(self.ops, self.terms[1:]):
            out += f"{op}{t}"
        return out

    @property
    def steps(self) -> list[str]:
        acc, lines = self.terms[0], []
        for op, t in zip(self.ops, self.terms[1:]):
            new = acc + t if op == "+" else acc - t
            lines.append(f"{acc}{op}{t}={new}")
            acc = new
        return lines

    @property
    def answer(self) -> int:
        acc = self.terms[0]
        for op, t in zip(self.ops, self.terms[1:]):
            acc = acc + t if op == "+" else acc - t
        return acc

    def question(self) -> str:
        return INSTRUCTION + self.expression

    def response(self, with_reasoning: bool = True) -> str:
        thoughts = "\n".join(self.steps) if with_reasoning else ""
        return f"<think>\n{thoughts}\n</think>\n\\boxed{{{self.answer}}}"


def is_held_out(p: ArithProblem) -> bool:
    """~10% of the problem space is reserved for evaluation and never trained on."""
    return hashlib.sha256(p.expression.encode()).digest()[0] < 26


def sample_problem(rng: random.Random) -> ArithProblem:
    k = rng.randint(MIN_TERMS, MAX_TERMS)
    terms = tuple(rng.randint(0, MAX_OPERAND) for _ in range(k))
    ops = tuple(rng.choice("+-") for _ in range(k - 1))
    return ArithProblem(terms, ops)


def problems(split: str, n: int, seed: int) -> list[ArithProblem]:
    """n distinct problems of `split` ("train" | "test"), deterministic in (split, n, seed)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    want_held_out = split == "test"
    rng = random.Random(f"arith-{split}-{seed}")
    seen, out = set(), []
    while len(out) < n:
        p = sample_problem(rng)
        if is_held_out(p) == want_held_out and p.expression not in seen:
            seen.add(p.expression)
            out.append(p)
    return out
