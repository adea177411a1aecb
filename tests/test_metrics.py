from math import comb

import pytest

from harness.metrics import compute_metrics, pass_at_k


def test_pass_at_k_matches_definition():
    # Probability that a random k-subset of n samples (c correct) holds at least one correct one.
    for n, c, k in [(10, 3, 1), (10, 3, 4), (8, 0, 2), (8, 8, 3), (5, 1, 5)]:
        expected = 1 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)


def _r(i, j, correct, parsed, tokens=10, truncated=False, meta=None):
    return {"id": i, "sample": j, "correct": correct, "parsed": parsed, "n_tokens": tokens,
            "truncated": truncated, "meta": meta or {}}


def test_metrics_over_samples():
    recs = [_r("a", 0, True, "1", 10, meta={"level": 1}), _r("a", 1, False, "2", 20, meta={"level": 1}),
            _r("a", 2, True, "1", 30, meta={"level": 1}), _r("a", 3, False, None, 40, True, meta={"level": 1}),
            _r("b", 0, False, "5", 10, meta={"level": 2}), _r("b", 1, False, "5", 10, meta={"level": 2}),
            _r("b", 2, True, "7", 10, meta={"level": 2}), _r("b", 3, False, "6", 10, meta={"level": 2})]
    m = compute_metrics(recs, breakdown_keys=("level",))
    assert m["acc"] == pytest.approx(3 / 8)
    assert m["pass@1"] == pytest.approx(3 / 8)
    assert m["pass@4"] == pytest.approx(1.0)
    assert m["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 2)
    assert m["maj@4"] == pytest.approx(0.5)        # a: "1" wins (correct); b: "5" wins (wrong)
    assert m["truncation_rate"] == pytest.approx(1 / 8)
    assert m["no_answer_rate"] == pytest.approx(1 / 8)
    assert m["tokens_mean"] == pytest.approx(140 / 8)
    assert m["acc_by_level"] == {"1": 0.5, "2": 0.25}


def test_single_sample_has_no_pass_at_k():
    m = compute_metrics([_r("a", 0, True, "1")])
    assert m["acc"] == 1.0 and "pass@1" not in m


def test_strict_accuracy_and_unfinished_rate_beside_acc():
    recs = [{**_r("a", 0, True, "1"), "correct_strict": False, "unfinished": True},
            {**_r("b", 0, True, "2", truncated=True), "correct_strict": False, "unfinished": False},
            {**_r("c", 0, True, "3"), "correct_strict": True, "unfinished": False},
            _r("d", 0, False, None)]                   # a record from before the two verdicts: strict = correct
    m = compute_metrics(recs)
    assert (m["acc"], m["acc_strict"], m["unfinished_rate"], m["truncation_rate"]) == (0.75, 0.25, 0.25, 0.25)


def test_sample_record_holds_both_verdicts():
    from harness.scoring import sample_record
    from harness import registry
    cls = registry.get("task", "math500")
    task = cls(cls.Config(name="math500"))
    from harness.types import Example
    ex = Example(id="x", question="1+1?", gold="2", meta={"level": 1})
    rec = sample_record(task, ex, "1+1?\n<think>\n", "it is \\boxed{2} surely", "length", sample=0, seed=7, n_tokens=9)
    assert {k: rec[k] for k in ("id", "sample", "seed", "n_tokens", "gold", "finish_reason", "correct", "correct_strict",
                                "truncated", "unfinished", "parsed_strict", "meta")} == {
        "id": "x", "sample": 0, "seed": 7, "n_tokens": 9, "gold": "2", "finish_reason": "length", "correct": True,
        "correct_strict": False, "truncated": True, "unfinished": True, "parsed_strict": None, "meta": {"level": 1}}
