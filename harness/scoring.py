"""Scoring rules shared by every task: two verdicts per sample, and the graders behind them.

`correct` (the headline `acc`) is **lighteval-compatible**: what the papers this harness reproduces
computed with lighteval's extractive match ("Quantization Hurts Reasoning?" pins lighteval eee93d7,
about 0.8.0: ruikangliu/Quantized-Reasoning-Models `lighteval_custom/tasks/reasoning.py` and
`lighteval_custom/metrics/dynamic_metrics.py`). The **whole completion** is searched -- a \\boxed{}
inside an unfinished trace counts -- unless `task.lighteval_version` names a lighteval that drops a
complete <think>...</think> pair first (0.11 on).

`correct_strict` is rqbench's own rule: when the model thinks (the prompt opened `<think>`, or the
completion has a think tag), only the text after the last `</think>` is graded, and reasoning that
never closed `</think>`, or any completion that hit the token limit, is wrong. A model that never
thinks is graded on its whole text by both rules.

`truncated` is finish_reason == "length" alone; `unfinished` is a thinking sample that never closed
`</think>`. Each kind of answer has a `grade_*` function (strict, over a final-answer text) and a
`lighteval_*` function (lighteval's extraction over the text lighteval would see).
"""
from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Callable, Sequence

from harness.types import Score, UserError

THINK_START, THINK_END = "<think>", "</think>"
# lighteval versions whose grading differs for reasoning models: 0.8 searches the whole completion
# (QRM's pinned copy); 0.11 added `remove_reasoning_tags` (lighteval/utils/utils.py, default on in
# lighteval/pipeline.py `PipelineParameters`), which drops complete <think>...</think> pairs first.
LIGHTEVAL_VERSIONS = ("0.8", "0.11")


def check_lighteval_version(version) -> str:
    v = str(version)
    if v not in LIGHTEVAL_VERSIONS:
        raise UserError(f"task.lighteval_version={version!r} is not allowed; allowed: "
                        f"{', '.join(LIGHTEVAL_VERSIONS)} (0.8: the whole completion is searched, as the papers' "
                        f"pinned lighteval; 0.11: a complete <think>...</think> pair is dropped first)")
    return v


def split_reasoning(completion: str, finish_reason: str = "stop") -> tuple[str, bool]:
    """(final answer text, no answer?): the text after the last </think>; none without one or at the limit."""
    if finish_reason == "length" or THINK_END not in completion:
        return "", True
    return completion.rsplit(THINK_END, 1)[1], False


def score_completion(completion: str, finish_reason: str, grade: Callable[[str], Score]) -> Score:
    """The strict reasoning rule around a final-answer grader: no closed </think> or at the limit -> wrong."""
    answer_text, truncated = split_reasoning(completion, finish_reason)
    if truncated:
        return Score(correct=False, parsed=None, truncated=True)
    return grade(answer_text)


def closed_think_prefill(prompt: str) -> str:
    """The think block a prompt already closed (e.g. `enable_thinking=False` pre-fills "<think>\\n\\n</think>").

    The model never writes that `</think>` itself, so the strict rule must see it.
    """
    start = prompt.rfind(THINK_START)
    return prompt[start:] if start >= 0 and THINK_END in prompt[start:] else ""


def prompt_opens_think(prompt: str) -> bool:
    """The prompt ends inside a think block (raw "...<think>\\n" prompts, thinking chat templates)."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


def remove_reasoning_tags(text: str) -> str:
    """lighteval >= 0.11 `remove_reasoning_tags(text, [("<think>", "</think>")])` (lighteval/utils/utils.py):
    while both tags are in the text, cut from the first <think> to the first </think> after it. A completion
    whose <think> came from the prompt holds only </think>, so nothing is removed."""
    while THINK_START in text and THINK_END in text:
        start = text.find(THINK_START)
        end = text.find(THINK_END, start)
        if end == -1:
            break
        text = text[:start] + text[end + len(THINK_END):]
    return text


def lighteval_view(completion: str, version: str = "0.8") -> str:
    """The text lighteval's metric reads: the completion, minus complete think pairs from 0.11 on."""
    return remove_reasoning_tags(completion) if str(version) != "0.8" else completion


def two_verdicts(prompt: str, completion: str, finish_reason: str, strict: Callable[[str], Score],
                 lighteval: Callable[[str], Score], version: str = "0.8") -> Score:
    """Both verdicts of one sample. `strict` and `lighteval` grade a text; this decides which text."""
    full = closed_think_prefill(prompt) + completion
    thinking = prompt_opens_think(prompt) or THINK_START in completion or THINK_END in completion
    truncated = finish_reason == "length"
    unfinished = thinking and THINK_END not in full
    lev = lighteval(lighteval_view(completion, version))
    if truncated or unfinished:
        s = Score(correct=False, parsed=None)
    else:
        s = strict(full.rsplit(THINK_END, 1)[1] if thinking else completion)
    extra = {**s.extra, **{f"lighteval_{k}": v for k, v in lev.extra.items()}}
    return Score(correct=bool(lev.correct), parsed=lev.parsed, truncated=truncated, unfinished=unfinished,
                 correct_strict=bool(s.correct), parsed_strict=s.parsed, extra=extra)


def grade_sample(task, ex, prompt: str, completion: str, finish_reason: str) -> dict:
    """The verdict fields of a sample record: what runs store and `rqbench-score` writes."""
    s = task.score(ex, completion, finish_reason, prompt=prompt)
    strict = s.correct if s.correct_strict is None else s.correct_strict
    return {"parsed": s.parsed, "parsed_strict": s.parsed if s.correct_strict is None else s.parsed_strict,
            "correct": bool(s.correct), "correct_strict": bool(strict), "truncated": bool(s.truncated),
            "unfinished": bool(s.unfinished), "extra": s.extra}


def sample_record(task, ex, prompt: str, completion: str, finish_reason: str, **fields) -> dict:
    """One line of samples.jsonl: the generation (`fields`: sample, seed, n_tokens), the gold and both verdicts."""
    return {"id": ex.id, **fields, "prompt": prompt, "completion": completion, "finish_reason": finish_reason,
            "gold": ex.gold, **grade_sample(task, ex, prompt, completion, finish_reason), "meta": ex.meta}


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


# ------------------------------------------------------------------ lighteval-compatible extraction
# math-verify is lighteval's extraction code (lighteval 0.8's metrics/utils/extractive_match_utils.py and
# math-verify share extract_target_from_pred and the Latex/Expr regexes), so the math grader calls it
# directly, configured as QRM's `multilingual_extractive_match_metric(...)` calls in reasoning.py.

LIGHTEVAL_PRECISION = 5     # reasoning.py: precision=5 for every metric


def _lighteval_pred_config():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig
    # reasoning.py: pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0))
    return (ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0))


@lru_cache(maxsize=4096)
def _lighteval_gold(gold: str, kind: str, main_thread: bool) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    config = (LatexExtractionConfig(),) if kind == "latex" else (ExprExtractionConfig(),)
    found = parse(gold, config, fallback_mode="first_match", **_math_verify_kwargs(main_thread)[0])
    # dynamic_metrics.py: a gold nothing is extracted from is compared as the raw string.
    return tuple(found) if found else (gold,)


def lighteval_gold_math(answer: str, kind: str) -> str:
    """The gold text lighteval parses. AIME (`kind="expr"`): the integer answer as it is. MATH-500
    (`kind="latex"`): QRM passes the whole reference solution, whose last \\boxed{} is the answer field;
    `\\boxed{answer}` extracts the same thing (checked on all 500: harness/bench/grading.py)."""
    return f"\\boxed{{{answer}}}" if kind == "latex" else answer


def lighteval_math(text: str, gold: str, kind: str = "latex") -> Score:
    """lighteval's extractive match for math: any extracted prediction equal to any extracted gold."""
    from math_verify import parse, verify
    main = threading.current_thread() is threading.main_thread()
    parse_kw, verify_kw = _math_verify_kwargs(main)
    pred = parse(text, _lighteval_pred_config(), fallback_mode="first_match", extraction_mode="any_match",
                 **parse_kw)
    if not pred:
        return Score(correct=False, parsed=None)
    golds = list(_lighteval_gold(lighteval_gold_math(gold, kind), kind, main))
    correct = any(verify(golds, p, float_rounding=LIGHTEVAL_PRECISION, **verify_kw) for p in pred)
    raw = next((p for p in pred if isinstance(p, str)), str(pred[0]))
    return Score(correct=correct, parsed=str(pred[0]), extra={"answer_text": raw})


@lru_cache(maxsize=16)
def _letter_regexes(letters: tuple[str, ...]):
    """lighteval 0.8 `lazy_indices_regex(IndicesExtractionConfig("NativeLetters"), len(choices), ENGLISH)`
    (lighteval/metrics/utils/extractive_match_utils.py), written out: math-verify 0.9 ships no
    IndicesExtractionConfig, and its StringExtractionConfig differs (\\s where lighteval has " ", other
    priorities, no bare-letter fallback). English literals: full stop ".", comma ",", colon ":", space " ".
    The group is named `string_keys` so math-verify's extract_target_from_pred extracts it."""
    from math_verify import StringExtractionConfig
    keys = f"(?P<string_keys>{'|'.join(re.escape(x) for x in letters)})"
    suffix = r"(?:\*\*)?(?:[\.]|[\,]|[\:]|\ |$)"
    answer_re = rf"(^|\ )(?:\*\*)?{keys}{suffix}"
    answer_start = rf"^(?:\*\*)?{keys}{suffix}"
    word = "(?i:answer)"
    patterns = [
        (rf"(?i:final answer is)\:?\s*{keys}\.?\s?I hope", 0),
        (rf"(?i:final answer.{{0,100}}?)\s+is\:?\s*{keys}", 50),
        (rf"{word}[\:].{{0,50}}?{answer_re}", 100),
        (rf"{word}.{{0,50}}?{answer_re}", 150),
        (answer_start, 200),
        (answer_re, 250),           # try_extract_without_anchor (default True)
        (keys, 300),                # any bare letter: "DNA" yields "D", as in lighteval
    ]
    target = StringExtractionConfig(strings=letters, lowercase=False)
    return [([(re.compile(p), prio) for p, prio in patterns], target)]


def _extract(text: str, regexes) -> list:
    from math_verify.parser import extract_target_from_pred
    # dynamic_metrics.py defaults: fallback_mode="first_match", extraction_mode="any_match".
    return extract_target_from_pred(text, regexes, fallback_mode="first_match", extraction_mode="any_match")


def lighteval_letter(text: str, gold: str, letters: Sequence[str] = ("A", "B", "C", "D")) -> Score:
    """lighteval's GPQA metric: IndicesExtractionConfig(prefix_for_extraction="NativeLetters") on both sides."""
    regexes = _letter_regexes(tuple(letters))
    pred = _extract(text, regexes)
    golds = _extract(gold, regexes) or [gold]
    correct = any(p.strip() and p.strip() == g.strip() for p in pred for g in golds)
    return Score(correct=correct, parsed=pred[0] if pred else None)


def lighteval_label(text: str, gold: str, labels: Sequence[str]) -> Score:
    """Word labels (FOLIO's True/False/Uncertain) by math-verify's StringExtractionConfig, the string
    counterpart of lighteval's letter rule (lighteval has no FOLIO task; our choice). Any capitalisation of
    the label counts; the label is returned as written in `labels`."""
    from math_verify import StringExtractionConfig
    from math_verify.parser import get_extraction_regexes
    forms = tuple(dict.fromkeys(f for lab in labels for f in (lab, lab.lower(), lab.upper(), lab.capitalize())))
    regexes = get_extraction_regexes([StringExtractionConfig(strings=forms, lowercase=True)])
    pred = _extract(text, regexes)
    by_lower = {lab.lower(): lab for lab in labels}
    parsed = by_lower.get(pred[0]) if pred else None
    return Score(correct=parsed is not None and parsed.lower() == gold.lower(), parsed=parsed)
