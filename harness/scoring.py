"""Scoring rules shared by every task: strip the reasoning, find the final answer.

Only the text after the last `</think>` is scored. A completion with no `</think>`, or one that
hit the token limit, is *truncated*: scored wrong and counted in the truncation rate, because
a reasoning model that never finished thinking gave no answer.
"""
from __future__ import annotations

THINK_END = "</think>"


def split_reasoning(completion: str, finish_reason: str = "stop") -> tuple[str, bool]:
    """(final answer text, truncated?)."""
    if finish_reason == "length" or THINK_END not in completion:
        return "", True
    return completion.rsplit(THINK_END, 1)[1], False


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
