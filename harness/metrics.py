"""Metrics over scored samples: accuracy (avg@n), unbiased pass@k, maj@n, truncation, lengths, breakdowns.

`acc`, pass@k, maj@n and the breakdowns use the lighteval-compatible verdict `correct`; `acc_strict` the
strict one (harness/scoring.py). `truncation_rate`: finish_reason "length"; `unfinished_rate`: thinking
samples that never closed </think>. Records written before the two verdicts existed count as strict.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from math import comb

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _ks(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks + ([n] if ks[-1] != n else [])


def by_example(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["id"]].append(r)
    return groups


def compute_metrics(records: list[dict], breakdown_keys=()) -> dict:
    if not records:
        return {"n_examples": 0, "n_samples": 0}
    groups = by_example(records)
    correct = np.array([bool(r["correct"]) for r in records])
    tokens = np.array([r["n_tokens"] for r in records], dtype=float)
    out = {
        "n_examples": len(groups),
        "n_samples": len(records),
        "acc": float(correct.mean()),
        "acc_strict": float(np.mean([bool(r.get("correct_strict", r["correct"])) for r in records])),
        "truncation_rate": float(np.mean([bool(r["truncated"]) for r in records])),
        "unfinished_rate": float(np.mean([bool(r.get("unfinished", False)) for r in records])),
        "no_answer_rate": float(np.mean([r["parsed"] is None for r in records])),
        "tokens_mean": float(tokens.mean()),
        "tokens_median": float(np.median(tokens)),
        "tokens_p90": float(np.percentile(tokens, 90)),
    }
    n_min = min(len(g) for g in groups.values())
    if n_min > 1:
        for k in _ks(n_min):
            out[f"pass@{k}"] = float(np.mean([pass_at_k(len(g), sum(bool(r["correct"]) for r in g), k)
                                               for g in groups.values()]))
        out[f"maj@{n_min}"] = float(np.mean([_majority_correct(g) for g in groups.values()]))
    for key in breakdown_keys:
        buckets: dict[str, list[bool]] = defaultdict(list)
        for r in records:
            buckets[str(r.get("meta", {}).get(key))].append(bool(r["correct"]))
        out[f"acc_by_{key}"] = {k: float(np.mean(v)) for k, v in sorted(buckets.items())}
    return out


def _majority_correct(group: list[dict]) -> bool:
    """Majority vote over parsed answers; ties go to the answer seen first. No answer at all: wrong."""
    answers = [r["parsed"] for r in group if r["parsed"] is not None]
    if not answers:
        return False
    top = Counter(answers).most_common(1)[0][0]
    return any(bool(r["correct"]) for r in group if r["parsed"] == top)
