"""FOLIO (Han et al. 2022): first-order-logic reasoning in natural language, True / False / Uncertain.

Accepts the hub's v2 layout (`yale-nlp/FOLIO`: premises as one newline-joined string) and the
v0.0 jsonl layout of the GitHub release (premises as a list). The two versions differ in stories
and labels, so their scores are not comparable.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.registry import register_task
from harness.scoring import grade_choice
from harness.tasks_base import BaseTask, TaskConfig
from harness.types import Example, Score, UserError

HUB_ID, HUB_SPLIT = "yale-nlp/FOLIO", "validation"
LABELS = ("True", "False", "Uncertain")
# Some copies of FOLIO call the third label "Unknown".
LABEL_ALIASES = {"true": "True", "false": "False", "uncertain": "Uncertain", "unknown": "Uncertain"}


@dataclass
class FolioConfig(TaskConfig):
    pass


def _premises(value, where: str) -> list[str]:
    if isinstance(value, str):
        lines = value.split("\n")
    elif isinstance(value, (list, tuple)) or hasattr(value, "tolist"):   # parquet gives numpy arrays
        lines = list(value)
    else:
        raise UserError(f"{where}: premises={value!r} is neither a newline-joined string nor a list of strings")
    return [str(p).strip() for p in lines if str(p).strip()]


@register_task("folio")
class FolioTask(BaseTask):
    Config = FolioConfig
    breakdown_keys = ("label",)

    def load(self) -> list[Example]:
        rows, source = self.records(HUB_ID, None, HUB_SPLIT)
        out = []
        for i, r in enumerate(rows):
            where = f"{source} record {i}"
            missing = [k for k in ("premises", "conclusion", "label") if k not in r]
            if missing:
                raise UserError(f"{where}: missing field(s) {', '.join(missing)}; a FOLIO record needs "
                                f"premises, conclusion, label")
            label = LABEL_ALIASES.get(str(r["label"]).strip().lower())
            if label is None:
                raise UserError(f"{where}: label={r['label']!r} is not allowed; allowed: {', '.join(LABELS)}")
            ex_id = r.get("id", r.get("example_id", i))
            out.append(Example(id=str(ex_id), gold=label, meta={"label": label},
                               question={"premises": _premises(r["premises"], where),
                                         "conclusion": str(r["conclusion"]).strip()}))
        return out

    def prompt_text(self, ex: Example) -> str:
        premises = "\n".join(f"{k}. {p}" for k, p in enumerate(ex.question["premises"], 1))
        return (f"Premises:\n{premises}\n\nConclusion: {ex.question['conclusion']}\n\n"
                "Based only on the premises above, is the conclusion True, False, or Uncertain "
                "(the premises neither prove nor disprove it)? Reason step by step. The last line of your "
                "response should be of the form 'Answer: True', 'Answer: False' or 'Answer: Uncertain'.")

    def grade(self, ex: Example, answer_text: str) -> Score:
        """Judge a final-answer text (reasoning already stripped)."""
        return grade_choice(answer_text, ex.gold, LABELS, ignore_case=True)
