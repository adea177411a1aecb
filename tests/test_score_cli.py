"""rqbench-score: re-grades a JSONL of outputs offline with the graders runs use."""
import json
from pathlib import Path

import pytest

from harness.score_cli import main

FIX = Path(__file__).resolve().parent / "fixtures" / "tasks"

ROWS = [
    # an unfinished trace cut at the token limit: lighteval finds the boxed answer, strict does not
    {"task": "math500", "answer": "\\frac{1}{2}", "completion": "<think>half is \\boxed{0.5}", "finish_reason": "length"},
    {"task": "aime120", "answer": "025", "completion": "The final answer is $\\boxed{25}$."},
    {"task": "gpqa_diamond", "answer": "C", "completion": "x</think>\nAnswer: C", "prompt": "Q\n<think>\n"},
    {"task": "folio", "answer": "Unknown", "completion": "Answer: Uncertain"},
    {"task": "temporal_sequences", "answer": "(B)", "completion": "So the answer is (D).", "choices": ["A", "B", "C", "D"]},
    {"task": "math500", "id": "test/prealgebra/9001.json", "completion": "\\boxed{0.875}"},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_grades_each_line_and_summarises_per_task(tmp_path, capsys):
    src, out = _write(tmp_path / "in.jsonl", ROWS), tmp_path / "out.jsonl"
    assert main([str(src), "-o", str(out), "--data-files", f"math500={FIX / 'math500.jsonl'}"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: r[k] for k in ("correct", "correct_strict", "truncated", "unfinished")} for r in got] == [
        {"correct": True, "correct_strict": False, "truncated": True, "unfinished": True},
        {"correct": True, "correct_strict": True, "truncated": False, "unfinished": False},
        {"correct": True, "correct_strict": True, "truncated": False, "unfinished": False},
        {"correct": True, "correct_strict": True, "truncated": False, "unfinished": False},
        {"correct": False, "correct_strict": False, "truncated": False, "unfinished": False},
        {"correct": True, "correct_strict": True, "truncated": False, "unfinished": False}]
    assert [r["parsed"] for r in got][3:5] == ["Uncertain", "(D)"]
    assert all({k: r[k] for k in ROWS[i]} == ROWS[i] for i, r in enumerate(got))     # the input is kept
    err = capsys.readouterr().err
    assert "math500" in err and "acc_strict" in err and "2  1.0000     0.5000" in err


def test_same_verdicts_as_a_run(tmp_path):
    """One grader: the sample record a run writes and rqbench-score agree field by field."""
    from harness import registry
    from harness.scoring import sample_record
    src, out = _write(tmp_path / "in.jsonl", ROWS[:1]), tmp_path / "out.jsonl"
    main([str(src), "-o", str(out)])
    graded = json.loads(out.read_text())
    cls = registry.get("task", "math500")
    task = cls(cls.Config(name="math500"))
    rec = sample_record(task, task.example_for("\\frac{1}{2}"), "", ROWS[0]["completion"], "length")
    assert {k: graded[k] for k in ("correct", "correct_strict", "parsed", "truncated", "unfinished")} == \
        {k: rec[k] for k in ("correct", "correct_strict", "parsed", "truncated", "unfinished")}


@pytest.mark.parametrize("line,message", [
    ('{"task": "nope", "answer": "1", "completion": "x"}', "line 1: task='nope' is not a task; allowed: aime120"),
    ('{"task": "math500", "completion": "x"}', "line 1: needs `answer` (the gold) or `id`"),
    ('{"task": "math500", "answer": "1"}', "line 1: missing field(s) completion"),
    ('{"task": "gpqa_diamond", "answer": "E", "completion": "x"}', "answer='E' is not allowed for a row; allowed: A, B, C, D"),
    ('{"task": "math500", "answer": "1", "completion": "x", "finish_reason": "eos"}', "finish_reason='eos' is not allowed"),
    ('{"task": "folio", "answer": "Maybe", "completion": "x"}', "answer='Maybe' is not allowed"),
    ("not json", "line 1: not JSON"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text(line + "\n")
    assert main([str(src)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rqbench-score: error: ") and message in err


def test_missing_input_file(tmp_path, capsys):
    assert main([str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
