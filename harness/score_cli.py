"""rqbench-score: re-grade a JSONL of model outputs with rqbench's graders -- offline, no model.

    rqbench-score IN.jsonl [-o OUT.jsonl] [--lighteval-version 0.8|0.11] [--data-files TASK=PATH ...]

Each input line: `task` (a task name: math500, aime120, gpqa_diamond, folio, temporal_sequences, arith),
`completion`, and the gold as `answer` (LaTeX for math, a letter for GPQA, True/False/Uncertain for FOLIO,
"(X)" for temporal sequences) or as `id` (an example id of the task's data: the hub, or --data-files);
optionally `finish_reason` ("stop" | "length", default "stop"), `choices` (the options, which set the letters)
and `prompt` (the rendered prompt: a prompt ending in "<think>\\n" makes the sample a thinking one).
Each output line is the input plus `correct` (lighteval-compatible), `correct_strict`, `parsed`, `truncated`
and `unfinished`: the same function (harness.scoring.grade_sample) that grades runs. A summary per task goes
to stderr. Exit 2 with one line naming the input line on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from harness.types import UserError

OUTPUT_FIELDS = ("correct", "correct_strict", "parsed", "truncated", "unfinished")
FINISH_REASONS = ("stop", "length")


class Grader:
    """Tasks built once per name (default config, or --data-files), and their examples when ids are used."""

    def __init__(self, lighteval_version: str, data_files: dict[str, str]):
        self.version, self.data_files = lighteval_version, data_files
        self.tasks: dict[str, object] = {}
        self.by_id: dict[str, dict] = {}

    def task(self, name: str):
        if name not in self.tasks:
            from harness import registry
            try:
                cls = registry.get("task", name)
            except Exception:
                raise UserError(f"task={name!r} is not a task; allowed: "
                                f"{', '.join(n for n in registry.available('task') if n not in ('lm_eval', 'validate'))}") from None
            if not hasattr(cls, "grade_lighteval"):
                raise UserError(f"task={name!r} has no sample grader (it evaluates a model directly)")
            self.tasks[name] = cls(cls.Config(name=name, data_files=self.data_files.get(name),
                                              lighteval_version=self.version))
        return self.tasks[name]

    def example(self, name: str, row: dict):
        task = self.task(name)
        if row.get("answer") is not None:
            return task, task.example_for(row["answer"], row.get("choices"), str(row.get("id", "")))
        if row.get("id") is None:
            raise UserError("needs `answer` (the gold) or `id` (an example of the task's data)")
        if name not in self.by_id:
            self.by_id[name] = {ex.id: ex for ex in task.examples()}
        ex = self.by_id[name].get(str(row["id"]))
        if ex is None:
            raise UserError(f"id={row['id']!r} is not an example of task {name}")
        return task, ex


def grade_row(grader: Grader, row: dict) -> dict:
    from harness.scoring import grade_sample
    if not isinstance(row, dict):
        raise UserError("is not a JSON object")
    missing = [k for k in ("task", "completion") if k not in row]
    if missing:
        raise UserError(f"missing field(s) {', '.join(missing)}")
    if not isinstance(row["completion"], str):
        raise UserError(f"completion must be a string, not {type(row['completion']).__name__}")
    finish = row.get("finish_reason") or "stop"
    if finish not in FINISH_REASONS:
        raise UserError(f"finish_reason={finish!r} is not allowed; allowed: {', '.join(FINISH_REASONS)}")
    task, ex = grader.example(str(row["task"]), row)
    v = grade_sample(task, ex, str(row.get("prompt") or ""), row["completion"], finish)
    return {**row, **{k: v[k] for k in OUTPUT_FIELDS}}


def summary(rows: list[dict]) -> str:
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[str(r["task"])].append(r)
    lines = [f"{'task':<20} {'n':>6} {'acc':>7} {'acc_strict':>10} {'truncated':>9} {'unfinished':>10}"]
    for name, rs in sorted(by_task.items()):
        n = len(rs)
        rate = lambda k: sum(bool(r[k]) for r in rs) / n  # noqa: E731
        lines.append(f"{name:<20} {n:>6} {rate('correct'):>7.4f} {rate('correct_strict'):>10.4f} "
                     f"{rate('truncated'):>9.4f} {rate('unfinished'):>10.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rqbench-score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="JSONL of outputs to grade")
    ap.add_argument("-o", "--output", default=None, help="graded JSONL (default: stdout)")
    ap.add_argument("--lighteval-version", default="0.8", help="grading of `correct`: 0.8 (default) | 0.11")
    ap.add_argument("--data-files", action="append", default=[], metavar="TASK=PATH",
                    help="local data of a task, for rows that give an `id` instead of an `answer`")
    args = ap.parse_args(argv)
    try:
        from harness.scoring import check_lighteval_version
        version = check_lighteval_version(args.lighteval_version)
        data_files = {}
        for item in args.data_files:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UserError(f"--data-files {item!r} is not allowed; allowed: TASK=PATH")
            data_files[name] = path
        src = Path(args.input)
        if not src.is_file():
            raise UserError(f"{args.input}: no such file")
        grader, out = Grader(version, data_files), []
        with src.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{src} line {n}: not JSON ({e.msg})") from None
                try:
                    out.append(grade_row(grader, row))
                except UserError as e:
                    raise UserError(f"{src} line {n}: {e}") from None
    except UserError as e:
        print(f"rqbench-score: error: {e}", file=sys.stderr)
        return 2
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in out)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    print(summary(out) if out else "(no rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
