"""The shared scoring rules: reasoning stripping, math equivalence, choice/label extraction precedence."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness.scoring import (boxed_contents, cut_at_next_question, extract_choice, grade_choice, grade_math,
                             last_boxed, score_completion, split_reasoning)
from harness.types import Score

LETTERS = ("A", "B", "C", "D")
LABELS = ("True", "False", "Uncertain")


# ------------------------------------------------------------------ reasoning rule

def test_split_reasoning_scores_only_after_last_think_end():
    text, truncated = split_reasoning("<think>maybe \\boxed{1}</think> no, </think> final \\boxed{2}")
    assert (text, truncated) == (" final \\boxed{2}", False)


@pytest.mark.parametrize("completion,finish", [("<think>still thinking \\boxed{2}", "stop"),
                                               ("<think>x</think> \\boxed{2}", "length")])
def test_no_think_end_or_length_is_truncated(completion, finish):
    assert split_reasoning(completion, finish) == ("", True)
    called = []
    s = score_completion(completion, finish, lambda t: called.append(t) or Score(True, "2"))
    assert (s.correct, s.parsed, s.truncated, called) == (False, None, True, [])


def test_score_completion_grades_the_answer_part():
    s = score_completion("<think>\\boxed{9}</think>The answer is \\boxed{2}.", "stop",
                         lambda t: Score(correct=t.strip() == "The answer is \\boxed{2}.", parsed=t))
    assert s.correct and not s.truncated


def test_boxed_helpers_balance_braces_and_keep_order():
    text = "first \\boxed{\\frac{1}{2}} then \\fbox{3} and \\boxed {x^{2}}"
    assert boxed_contents(text) == ["\\frac{1}{2}", "3", "x^{2}"]
    assert last_boxed(text) == "x^{2}"
    assert boxed_contents("\\boxed{unclosed {") == []


# ------------------------------------------------------------------ math

@pytest.mark.parametrize("answer,gold", [
    ("so $x = \\boxed{\\frac{1}{2}}$", "\\frac12"),          # bare-LaTeX gold must still parse
    ("The answer is \\boxed{0.5}.", "\\frac{1}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("Total: $\\boxed{\\$9.00}$", "\\$9.00"),                # escaped dollars are not math delimiters
    ("\\boxed{10000}", "10{,}000"),                          # thousands separator in the gold
    ("\\boxed{5\\sqrt{2}}", "\\sqrt{50}"),
])
def test_math_equivalent_answers_are_correct(answer, gold):
    assert grade_math(answer, gold).correct


def test_math_wrong_and_missing_answers():
    assert not grade_math("\\boxed{3}", "4").correct
    s = grade_math("I could not solve it.", "4")
    assert (s.correct, s.parsed) == (False, None)


def test_math_boxed_answer_preferred_over_later_latex():
    s = grade_math("Hence \\boxed{12}. Check: with $x = 5$ we get $y = 7$.", "12")
    assert s.correct and s.extra["answer_text"] == "12"
    # math-verify's default ranks "final answer is" level with \boxed and then takes the rightmost.
    assert grade_math("So \\boxed{12}. (With negatives allowed, the final answer is $-12$.)", "12").correct


def test_math_verify_order_is_gold_then_prediction():
    # math-verify is asymmetric here: an interval gold accepts no inequality, an inequality gold accepts the interval.
    assert not grade_math("\\boxed{x<2}", "(-\\infty,2)").correct
    assert grade_math("\\boxed{(-\\infty,2)}", "x<2").correct


def test_math_parsed_is_canonical_for_majority_voting():
    assert grade_math("\\boxed{0.5}", "1/2").parsed == grade_math("\\boxed{\\frac{1}{2}}", "1/2").parsed


def test_math_grading_works_outside_the_main_thread():
    # math-verify's default timeouts use signal.alarm and raise in any thread but the main one.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda a: grade_math(a, "\\frac{7}{8}").correct,
                                ["\\boxed{\\frac{7}{8}}", "\\boxed{0.875}", "\\boxed{7}"]))
    assert results == [True, True, False]


def test_math_grading_does_not_depend_on_machine_load(monkeypatch):
    """A slow sympy (a loaded node) must not turn a correct answer wrong: the guard against hangs is set far
    above math-verify's 5 s default. Simulated: time advances 10 s inside each parse."""
    import math_verify

    from harness import scoring
    scoring._parse_gold_cached.cache_clear()
    limits = []
    real_parse = math_verify.parse

    def slow_parse(text, *args, parsing_timeout=5, **kw):
        limits.append(parsing_timeout)
        if parsing_timeout is not None and parsing_timeout < 10:     # what a 10 s parse would do to the default
            return []
        return real_parse(text, *args, parsing_timeout=parsing_timeout, **kw)
    monkeypatch.setattr(math_verify, "parse", slow_parse)
    assert grade_math("\\boxed{\\frac{7}{8}}", "\\frac{7}{8}").correct
    assert limits and all(t is not None and t >= 10 for t in limits)
    scoring._parse_gold_cached.cache_clear()


# ------------------------------------------------------------------ choices and labels

@pytest.mark.parametrize("text,expected", [
    ("Answer: B", "B"),
    ("Option (A) looks right at first.\nAnswer: C", "C"),                    # explicit beats parenthesised
    ("Answer: A\nOn reflection...\nAnswer: D", "D"),                         # last of a kind wins
    ("So the answer is (A).", "A"),
    ("**Answer:** D", "D"),
    ("**Answer: C**", "C"),
    ("Answer: B\nso I box it: \\boxed{C}", "B"),                             # explicit beats boxed
    ("(A) and (B) fail, so \\boxed{D}", "D"),                                # boxed beats parenthesised
    ("The final answer is $\\boxed{\\text{(B)}}$.", "B"),
    ("Both (A) and (C) are possible, but (C) fits.", "C"),                   # last parenthesised
    ("\n\nB\n", "B"),                                                        # the whole answer is a letter
    ("Answer: Both options are wrong.", None),                              # "B" of "Both" is no answer
    ("answer: a", None),                                                     # letters are case-sensitive
    ("Answer: E", None),                                                     # not among the choices
    ("I am not sure.", None),
])
def test_letter_extraction_precedence(text, expected):
    assert extract_choice(text, LETTERS) == expected


@pytest.mark.parametrize("text,expected", [
    ("The conclusion is False at first glance. Answer: Uncertain", "Uncertain"),
    ("answer: true", "True"),
    ("The answer is **False**.", "False"),
    ("$\\boxed{\\text{Uncertain}}$", "Uncertain"),
    ("**Uncertain**.", "Uncertain"),
    ("It might be true or false.", None),
])
def test_label_extraction(text, expected):
    assert extract_choice(text, LABELS, ignore_case=True) == expected


def test_grade_choice():
    assert grade_choice("Answer: C", "C", LETTERS).correct
    s = grade_choice("Answer: B", "C", LETTERS)
    assert (s.correct, s.parsed) == (False, "B")


def test_cut_at_next_question_drops_invented_follow_up():
    text = ("free from 9am to 10am. So the answer is (B).\n\nQ: Today, Ann went to the zoo.\n"
            "Options:\n(A) 1pm to 2pm\n(D) 2pm to 3pm")
    assert cut_at_next_question(text) == "free from 9am to 10am. So the answer is (B)."
    assert extract_choice(cut_at_next_question(text), LETTERS) == "B"
    assert extract_choice("(A) 1pm\n(D) 2pm", LETTERS) == "D"     # what scoring the uncut text would see


# ------------------------------------------------------------------ two verdicts (lighteval-compatible and strict)

from harness.scoring import (lighteval_label, lighteval_letter, lighteval_math, remove_reasoning_tags,  # noqa: E402
                             two_verdicts)


def _verdicts(prompt, completion, gold="2", finish="stop", version="0.8"):
    return two_verdicts(prompt, completion, finish, lambda t: grade_math(t, gold),
                        lambda t: lighteval_math(t, gold, "latex"), version)


def test_non_thinking_completion_is_graded_whole_by_both_rules():
    s = _verdicts("What is 1+1?", "1+1 = 2, so the answer is \\boxed{2}.")
    assert (s.correct, s.correct_strict, s.truncated, s.unfinished) == (True, True, False, False)


def test_unclosed_think_counts_for_lighteval_only():
    s = _verdicts("What is 1+1?\n<think>\n", "Adding gives \\boxed{2}. Let me double-check")
    assert (s.correct, s.correct_strict, s.truncated, s.unfinished) == (True, False, False, True)
    assert s.parsed_strict is None


def test_closed_think_both_rules_read_the_final_boxed_answer():
    s = _verdicts("Q\n<think>\n", "maybe \\boxed{3}? no.\n</think>\nThe answer is \\boxed{2}.")
    assert (s.correct, s.correct_strict, s.unfinished) == (True, True, False)
    s = _verdicts("Q\n<think>\n", "surely \\boxed{2}.\n</think>\nThe answer is \\boxed{3}.")
    assert (s.correct, s.correct_strict) == (False, False)


def test_length_is_truncated_and_strictly_wrong_but_lighteval_still_searches():
    s = _verdicts("Q\n<think>\n", "\\boxed{2}</think> \\boxed{2}", finish="length")
    assert (s.truncated, s.unfinished, s.correct, s.correct_strict) == (True, False, True, False)


def test_prompt_that_closed_the_think_block_is_not_thinking():
    s = _verdicts("Q<think>\n\n</think>\n\n", "\\boxed{2}")        # enable_thinking=False pre-fill
    assert (s.correct, s.correct_strict, s.unfinished) == (True, True, False)


def test_lighteval_version_0_11_drops_complete_think_pairs_only():
    # lighteval >= 0.11 remove_reasoning_tags: both tags in the completion -> the block is cut.
    assert remove_reasoning_tags("<think>a \\boxed{2}</think> b") == " b"
    assert remove_reasoning_tags("a</think> b") == "a</think> b"             # <think> was in the prompt
    assert remove_reasoning_tags("</think> x <think> y") == "</think> x <think> y"   # no </think> after <think>
    pair = "<think>\\boxed{2}</think> I give up."
    assert _verdicts("Q", pair, version="0.8").correct
    assert not _verdicts("Q", pair, version="0.11").correct
    assert _verdicts("Q\n<think>\n", "\\boxed{2}</think> I give up.", version="0.11").correct


def test_lighteval_math_as_qrm_configures_it():
    assert lighteval_math("so $x = \\frac{1}{2}$ and \\boxed{0.5}", "\\frac12", "latex").correct
    assert lighteval_math("The final answer is 25", "025", "expr").correct      # Expr gold, no box needed
    assert lighteval_math("\\boxed{3.14159}", "3.141592", "expr").correct      # precision 5
    assert not lighteval_math("nothing here", "4", "expr").correct


@pytest.mark.parametrize("text,expected", [
    ("Answer: B", "B"),
    ("**Answer: C**", "C"),
    ("The final answer is D", "D"),
    ("Answer:\nB", "B"),                     # no " " before the letter: only the bare-letter fallback finds it
    ("The answer involves DNA.", "A"),       # lighteval's bare-letter fallback takes the rightmost capital A-D
    ("B) is wrong. Answer: (C)", "C"),       # "(C)" fits no anchor: the bare-letter fallback, rightmost
    ("Answer: B\nDone. (See part C)", "C"),  # a newline after the letter breaks the anchor: bare fallback
    ("Answer: B. Done. (See part C)", "B"),   # an anchored answer beats a later bare letter
    ("no letter here", None),
])
def test_lighteval_letter_rule_reproduces_lighteval_quirks(text, expected):
    """Expected values are lighteval 0.8.1's own extraction (checked in a side venv; harness/bench/grading.py)."""
    assert lighteval_letter(text, "B").parsed == expected


def test_lighteval_label_rule():
    assert lighteval_label("So the conclusion is uncertain.", "Uncertain", ("True", "False", "Uncertain")).correct
    s = lighteval_label("Answer: False", "True", ("True", "False", "Uncertain"))
    assert (s.correct, s.parsed) == (False, "False")
