"""Scoring rules shared by every task: strip the reasoning, find the final answer, judge it.

Only the text after the last `</think>` is scored. A completion with no `</think>`, or one that
hit the token limit, is *truncated*: scored wrong and counted in the truncation rate, because
a reasoning model that never finished thinking gave no answer.

Each kind of answer has a `grade_*` function that judges a plain final-answer text (what is left
after the reasoning is stripped); `score_completion` adds the reasoning/truncation rule on top.
Keeping the two apart lets the validation script re-grade outputs of non-reasoning models,
which have no `</think>` at all.
"""
from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Callable, Sequence

from harness.types import Score

THINK_END = "</think>"


def split_reasoning(completion: str, finish_reason: str = "stop") -> tuple[str, bool]:
    """(final answer text, truncated?)."""
    if finish_reason == "length" or THINK_END not in completion:
        return "", True
    return completion.rsplit(THINK_END, 1)[1], False


def score_completion(completion: str, finish_reason: str, grade: Callable[[str], Score]) -> Score:
    """The reasoning rule around a final-answer grader: truncated completions are wrong, unparsed."""
    answer_text, truncated = split_reasoning(completion, finish_reason)
    if truncated:
        return Score(correct=False, parsed=None, truncated=True)
    return grade(answer_text)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    for marker in ("\\boxed", "\\fbox"):
        start = text.rfind(marker)
        if start < 0:
            continue
        i = start + len(marker)
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text) or text[i] != "{":
            continue
        depth, j = 0, i
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1: j].strip()
            j += 1
    return None


def boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...} with balanced braces, in text order."""
    out: list[str] = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth = 0
        for j in range(m.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append(text[m.end(): j].strip())
                break
    return out


def cut_at_next_question(text: str) -> str:
    """Drop a few-shot continuation: models prompted with "Q: ... A: ..." exemplars often go on to
    invent the next "Q:" (with its own options) after answering, which must not be scored."""
    return re.split(r"\n\s*Q:", text, maxsplit=1)[0]


# ------------------------------------------------------------------ math (math-verify)

# math-verify's own default (5 s) guards against pathological sympy inputs, but on a loaded machine
# (a busy node, a parallel sweep) ordinary reference solutions took longer than that: parsing gave up
# and correct answers were graded wrong, so scores depended on machine load. A generous limit keeps
# the guard and makes grading load-independent.
MATH_VERIFY_TIMEOUT_S = 60


def _math_verify_kwargs(main_thread: bool | None = None) -> tuple[dict, dict]:
    """(parse kwargs, verify kwargs). math-verify's timeouts use signal.alarm, which only works in the main
    thread; elsewhere (a scoring thread pool, a web server) they must be off or every call raises."""
    if main_thread is None:
        main_thread = threading.current_thread() is threading.main_thread()
    limit = MATH_VERIFY_TIMEOUT_S if main_thread else None
    return {"parsing_timeout": limit}, {"timeout_seconds": limit}


def _pred_config():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig
    # boxed_match_priority=0: a \boxed{} answer wins over "final answer is ..." and bare LaTeX,
    # which matters when a model boxes its answer and then keeps talking.
    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


@lru_cache(maxsize=4096)
def _parse_gold_cached(gold: str, main_thread: bool):
    from math_verify import parse
    # math-verify only extracts LaTeX inside $..$ or \boxed{}: a bare gold like "\frac{1}{9}"
    # would otherwise parse as nothing, and every prediction would be judged wrong. An escaped
    # "\$" (a price: "\$18.90") is not a delimiter.
    delimited = re.search(r"(?<!\\)\$", gold) or "\\boxed" in gold
    wrapped = gold if delimited else f"${gold}$"
    return tuple(parse(wrapped, **_math_verify_kwargs(main_thread)[0]))


def parse_gold_math(gold: str) -> list:
    return list(_parse_gold_cached(gold, threading.current_thread() is threading.main_thread()))


def grade_math(answer_text: str, gold: str) -> Score:
    """Final-answer text vs a LaTeX gold, by math-verify equivalence (boxed answers preferred).

    Score.parsed is math-verify's canonical form of the extracted answer (so majority voting
    groups "0.5" with "\\frac12"); extra["answer_text"] keeps the text as the model wrote it.
    """
    from math_verify import parse, verify
    parse_kw, verify_kw = _math_verify_kwargs()
    pred = parse(answer_text, _pred_config(), **parse_kw)
    if not pred:
        return Score(correct=False, parsed=None)
    # Order matters: verify(gold, pred). The gold side may be a set of acceptable forms.
    correct = bool(verify(parse_gold_math(gold), pred, **verify_kw))
    raw = next((p for p in pred if isinstance(p, str)), str(pred[0]))
    return Score(correct=correct, parsed=str(pred[0]), extra={"answer_text": raw})


# ------------------------------------------------------------------ choices and labels

_WRAPPERS = re.compile(r"\\text(?:bf|it|rm)?\s*\{([^{}]*)\}")


def _clean(s: str) -> str:
    """Strip formatting around a short answer: \\text{..}, $, *, (), quotes, final period."""
    s, prev = _WRAPPERS.sub(r"\1", s), None
    while s != prev:          # wrappers nest in any order: "**(B).**", "$(B)$."
        prev, s = s, s.strip().strip("$*_`'\".()").strip()
    return s


def extract_choice(text: str, choices: Sequence[str], ignore_case: bool = False) -> str | None:
    """The answer among `choices` (letters like "A".."D", or labels like "True"/"False"/"Uncertain").

    Precedence, first kind that matches wins; within a kind the LAST occurrence wins, because
    models restate options while reasoning and commit at the end:
      1. an explicit answer statement: "Answer: X", "the answer is (X)", "**Answer:** X";
      2. a boxed answer: \\boxed{X}, \\boxed{\\text{(X)}};
      3. a parenthesised choice: "(X)";
      4. the whole final text is just the choice ("B", "**Uncertain**.").
    Letters are matched case-sensitively ("a" is an English word); labels with ignore_case.
    """
    by_key = {(c.lower() if ignore_case else c): c for c in choices}
    norm = (lambda s: s.lower()) if ignore_case else (lambda s: s)
    alt = "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))
    flags = re.IGNORECASE if ignore_case else 0
    # The word "answer" itself is always case-insensitive; the choice only when ignore_case.
    explicit = re.compile(rf"(?i:answer)(?:\s+(?i:is))?\s*[:：]?[\s*_$]*\(?({alt})\)?(?![A-Za-z0-9])", flags)
    hits = [m.group(1) for m in explicit.finditer(text)]
    if hits:
        return by_key[norm(hits[-1])]
    boxed = [by_key[norm(_clean(b))] for b in boxed_contents(text) if norm(_clean(b)) in by_key]
    if boxed:
        return boxed[-1]
    paren = re.findall(rf"\(({alt})\)", text, flags)
    if paren:
        return by_key[norm(paren[-1])]
    whole = norm(_clean(text))
    return by_key.get(whole)


def grade_choice(answer_text: str, gold: str, choices: Sequence[str], ignore_case: bool = False) -> Score:
    parsed = extract_choice(answer_text, choices, ignore_case)
    return Score(correct=parsed is not None and parsed == gold, parsed=parsed)
