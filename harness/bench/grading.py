"""Does `correct` agree with lighteval as the papers ran it? rqbench's graders vs lighteval 0.8.1, side by side.

    python -m harness.bench.grading /path/to/shared/data /path/to/lighteval-venv/bin/python [--out DIR]

lighteval is never imported here: it runs in its own environment (`python -m venv /tmp/lev &&
/tmp/lev/bin/pip install "lighteval[math]==0.8.1" && /tmp/lev/bin/pip install "pyarrow<18" "datasets==3.2.0"`),
given every case as JSONL, and graded with `multilingual_extractive_match_metric` configured as
"Quantization Hurts Reasoning?" configures it (ruikangliu/Quantized-Reasoning-Models
lighteval_custom/tasks/reasoning.py: latex_gold_metric / expr_gold_metric / gpqa_metric).

Kinds of cases, built from the real outputs in shared/data (nothing is written back there):
  math_*     Qwen2.5-Math CoT on MATH (284): as they are; re-shaped as reasoning outputs (closed think: the
             output, "</think>", its last line again; unclosed think; cut at half its words, finish "length");
             LaTeX gold (MATH-500's metric) -- and, for the 190 integer golds, Expr gold (AIME's metric).
  bbh_*      code-davinci-002 3-shot CoT on BBH temporal sequences (250), the same four shapes, letter rule.
  letters_*  GPQA-style answers in 22 forms ("Answer: C", "**Answer:** C", "\\boxed{C}", "(C)", "Answer:\\nC",
             ...) after a real BBH reasoning body, right and wrong letters, without and with a closed think.
Also: MATH-500's 500 reference solutions vs `\\boxed{answer}` as lighteval's gold (QRM passes the solution;
rqbench has the answer field): the extracted golds must be equal.
Prints one table per kind (lighteval acc, rqbench acc, agreement, rqbench acc_strict) and every disagreement.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

# Runs inside the lighteval venv: reads cases, writes one verdict per line.
LIGHTEVAL_SCRIPT = r'''
import json, sys, logging
logging.disable(logging.WARNING)
from lighteval.metrics.dynamic_metrics import (ExprExtractionConfig, IndicesExtractionConfig, LatexExtractionConfig,
                                               multilingual_extractive_match_metric)
from lighteval.metrics.utils.extractive_match_utils import extract_target_from_pred, get_extraction_regexes
from lighteval.metrics.utils.math_comparison import compare_gold_target
from lighteval.tasks.requests import Doc
from lighteval.utils.language import Language
pred = (ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0))
metrics = {
    "latex": multilingual_extractive_match_metric(language=Language.ENGLISH, fallback_mode="first_match", precision=5,
             gold_extraction_target=(LatexExtractionConfig(),), pred_extraction_target=pred, aggregation_function=max),
    "expr": multilingual_extractive_match_metric(language=Language.ENGLISH, fallback_mode="first_match", precision=5,
            gold_extraction_target=(ExprExtractionConfig(),), pred_extraction_target=pred, aggregation_function=max),
    "letter": multilingual_extractive_match_metric(language=Language.ENGLISH,
              gold_extraction_target=[IndicesExtractionConfig(prefix_for_extraction="NativeLetters")],
              pred_extraction_target=[IndicesExtractionConfig(prefix_for_extraction="NativeLetters")], precision=5),
}
out = open(sys.argv[2], "w")
for line in open(sys.argv[1]):
    c = json.loads(line)
    if c["kind"] == "gold_equivalence":      # solution vs \boxed{answer}: same extracted gold?
        doc = Doc(query="", choices=[""], gold_index=0)
        rx = get_extraction_regexes(doc, (LatexExtractionConfig(),), Language.ENGLISH)
        a = extract_target_from_pred(c["solution"], rx, "first_match", "any_match", 5)
        b = extract_target_from_pred(c["boxed"], rx, "first_match", "any_match", 5)
        same = bool(a) and bool(b) and compare_gold_target(a, b, 5, timeout_seconds=5) and compare_gold_target(b, a, 5, timeout_seconds=5)
        out.write(json.dumps({"correct": bool(same), "a": [str(x) for x in a], "b": [str(x) for x in b]}) + "\n")
        continue
    n = c.get("n_letters", 4)
    choices = [c["lev_gold"]] if c["lev_kind"] != "letter" else list("ABCDEFGHIJ"[:n])
    gold_index = 0 if c["lev_kind"] != "letter" else choices.index(c["lev_gold"])
    doc = Doc(query="", choices=choices, gold_index=gold_index)
    golds = [choices[gold_index]]
    score = metrics[c["lev_kind"]].sample_level_fn(golds=golds, predictions=[c["completion"]], formatted_doc=doc)
    out.write(json.dumps({"correct": bool(score >= 1.0), "extracted": (doc.specific or {}).get("extracted_predictions")}) + "\n")
'''

FORMS = ["Answer: {X}", "**Answer:** {X}", "**Answer: {X}**", "The answer is ({X}).", "The answer is {X}.",
         "$\\boxed{{{X}}}$", "\\boxed{{\\text{{{X}}}}}", "{X}", "({X})", "{X})", "Answer: ({X})", "ANSWER: {X}",
         "Final answer: {X}", "The final answer is {X}. I hope it is correct.", "I choose option {X}.",
         "Answer:\n{X}", "Answer: {X}\n", "Answer: $\\text{{{X}}}$", "answer: {x}", "**{X}**",
         "So the correct option is {X}, the interval above.", "Answer - {X}"]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]


def _shapes(output: str) -> dict[str, tuple[str, str, str]]:
    """(prompt, completion, finish_reason) of one real output, as is and re-shaped as a reasoning output."""
    last = output.strip().splitlines()[-1]
    words = output.split(" ")
    return {"as_is": ("", output, "stop"),
            "closed_think": ("Q\n<think>\n", f"{output}\n</think>\n\n{last}", "stop"),
            "unclosed_think": ("Q\n<think>\n", output, "stop"),
            "cut_at_limit": ("Q\n<think>\n", " ".join(words[: len(words) // 2]), "length")}


def build_cases(data: Path) -> list[dict]:
    cases = []
    for r in _read(data / "scorer_validation_qwen25math_math.jsonl"):
        gold = r["gold_answer"]
        for shape, (prompt, text, finish) in _shapes(r["model_output"]).items():
            base = {"id": f"{r['problem_id']}#{r['sample_index']}", "prompt": prompt, "completion": text,
                    "finish_reason": finish, "answer": gold}
            # rqbench's math500 grader gives lighteval the gold \boxed{answer} (see gold_equivalence)
            cases.append({**base, "kind": f"math_{shape}", "task": "math500", "lev_kind": "latex",
                          "lev_gold": f"\\boxed{{{gold}}}"})
            if re.fullmatch(r"\d{1,3}", gold):
                cases.append({**base, "kind": f"math_expr_gold_{shape}", "task": "aime120", "lev_kind": "expr",
                              "lev_gold": gold})
    from harness.scoring import cut_at_next_question
    bbh = _read(data / "scorer_validation_bbh_temporal_codedavinci002.jsonl")
    for r in bbh:
        letter = r["gold_answer"].strip("()")
        for shape, (prompt, text, finish) in _shapes(r["model_output"]).items():
            cases.append({"id": r["problem_id"], "kind": f"bbh_{shape}", "task": "temporal_sequences",
                          "prompt": prompt, "completion": text, "finish_reason": finish, "answer": r["gold_answer"],
                          "lev_kind": "letter", "lev_gold": letter, "lev_text": cut_at_next_question(text)})
    for k, r in enumerate(bbh):
        body = re.sub(r"So the answer is \([A-D]\)\.?\s*$", "", r["model_output"]).strip()
        gold = r["gold_answer"].strip("()")
        for f, form in enumerate(FORMS):
            x = gold if (k + f) % 2 == 0 else "ABCD"[("ABCD".index(gold) + 1 + k % 3) % 4]
            answer = form.format(X=x, x=x.lower())
            for kind, prompt, text in (("letters_plain", "", f"{body}\n\n{answer}"),
                                       ("letters_closed_think", "Q\n<think>\n", f"{body}\n</think>\n\n{answer}")):
                cases.append({"id": f"{r['problem_id']}/form{f}", "kind": kind, "task": "gpqa_diamond",
                              "prompt": prompt, "completion": text, "finish_reason": "stop", "answer": gold,
                              "lev_kind": "letter", "lev_gold": gold, "form": form})
    for r in _read(data / "math500.jsonl"):
        cases.append({"id": r["unique_id"], "kind": "gold_equivalence", "solution": r["solution"],
                      "boxed": f"\\boxed{{{r['answer']}}}"})
    return cases


def run_lighteval(python: str, cases: list[dict], workdir: Path) -> list[dict]:
    src, dst, script = workdir / "cases.jsonl", workdir / "verdicts.jsonl", workdir / "lev.py"
    src.write_text("".join(json.dumps({**c, "completion": c.get("lev_text", c.get("completion"))}) + "\n"
                           for c in cases))
    script.write_text(LIGHTEVAL_SCRIPT)
    subprocess.run([python, str(script), str(src), str(dst)], check=True)
    return _read(dst)


def grade_ours(cases: list[dict]) -> list[dict]:
    from harness import registry
    from harness.scoring import grade_sample
    tasks, out = {}, []
    for c in cases:
        if c["kind"] == "gold_equivalence":
            out.append({})
            continue
        if c["task"] not in tasks:
            cls = registry.get("task", c["task"])
            tasks[c["task"]] = cls(cls.Config(name=c["task"]))
        task = tasks[c["task"]]
        out.append(grade_sample(task, task.example_for(c["answer"]), c["prompt"], c["completion"], c["finish_reason"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("lighteval_python", help="python of a venv with lighteval[math]==0.8.1")
    ap.add_argument("--out", type=Path, default=None, help="write every case with both verdicts here (JSONL)")
    args = ap.parse_args(argv)
    cases = build_cases(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        lev = run_lighteval(args.lighteval_python, cases, Path(tmp))
    ours = grade_ours(cases)
    table, disagreements = defaultdict(lambda: [0, 0, 0, 0, 0]), defaultdict(list)
    for c, lv, us in zip(cases, lev, ours):
        if c["kind"] == "gold_equivalence":
            t = table[c["kind"]]
            t[0] += 1
            t[1] += lv["correct"]
            if not lv["correct"]:
                disagreements[c["kind"]].append(f"{c['id']}: solution -> {lv['a']}, \\boxed{{answer}} -> {lv['b']}")
            continue
        t = table[c["kind"]]
        t[0] += 1
        t[1] += lv["correct"]
        t[2] += us["correct"]
        t[3] += lv["correct"] == us["correct"]
        t[4] += us["correct_strict"]
        if lv["correct"] != us["correct"]:
            disagreements[c["kind"]].append(
                f"{c['id']}: gold {c['answer']!r}; lighteval {lv['correct']} (extracted {lv.get('extracted')}), "
                f"rqbench {us['correct']} (parsed {us['parsed']!r})" + (f"; form {c['form']!r}" if "form" in c else ""))
        c.update(lighteval_correct=lv["correct"], **{k: us[k] for k in ("correct", "correct_strict", "parsed")})
    print(f"{'kind':<32} {'n':>5} {'lighteval acc':>13} {'rqbench acc':>11} {'agree':>8} {'acc_strict':>10}")
    for kind, (n, lv, us, agree, strict) in table.items():
        if kind == "gold_equivalence":
            print(f"{kind:<32} {n:>5}   solution and \\boxed{{answer}} give the same gold: {lv}/{n}")
            continue
        print(f"{kind:<32} {n:>5} {lv / n:>13.4f} {us / n:>11.4f} {agree / n:>8.2%} {strict / n:>10.4f}")
    for kind, lines in disagreements.items():
        print(f"\n{kind}: {len(lines)} disagreement(s)")
        for line in lines:
            print("  " + line)
    if args.out:
        args.out.write_text("".join(json.dumps(c, default=str) + "\n" for c in cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
