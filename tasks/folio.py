"""FOLIO (Han et al. 2022): first-order-logic reasoning in natural language, True / False / Uncertain.

Accepts the hub's v2 layout (`yale-nlp/FOLIO`: premises as one newline-joined string) and the
v0.0 jsonl layout of the GitHub release (premises as a list). The two versions differ in stories
and labels, so their scores are not comparable: every result records which one it read
(`task_info.folio_version`, from the layout of the rows).
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.registry import register_task
from harness.scoring import grade_choice, lighteval_label
from harness.tasks_base import BaseTask, TaskConfig, Template
from harness.types import Example, Score, UserError

HUB_ID, HUB_SPLIT = "yale-nlp/FOLIO", "validation"
LABELS = ("True", "False", "Uncertain")
# Some copies of FOLIO call the third label "Unknown".
LABEL_ALIASES = {"true": "True", "false": "False", "uncertain": "Uncertain", "unknown": "Uncertain"}




def _rqbench_prompt(ex: Example) -> str:
    premises = "\n".join(f"{k}. {p}" for k, p in enumerate(ex.question["premises"], 1))
    return (f"Premises:\n{premises}\n\nConclusion: {ex.question['conclusion']}\n\n"
            "Based only on the premises above, is the conclusion True, False, or Uncertain "
            "(the premises neither prove nor disprove it)? Reason step by step. The last line of your "
            "response should be of the form 'Answer: True', 'Answer: False' or 'Answer: Uncertain'.")


# psunlpgroup/QuantLRM inference_vllm.py (FOLIO loop), on yale-nlp/FOLIO's raw `premises` string:
#   "Use logical deductions to determine whether the provided conclusion is true, false, or uncertain based on
#   premise. Consider all relevant information to reach a logical conclusion.\n\n*******\nPremise: " +
#   d['premises'] + "\n*******\n\n*******\nConclusion: " + d['conclusion'] + "\n*******<think>\n"
# (no newline before <think>, unlike its other prompts).
def _quantlrm_prompt(ex: Example) -> str:
    return ("Use logical deductions to determine whether the provided conclusion is true, false, or uncertain "
            "based on premise. Consider all relevant information to reach a logical conclusion.\n\n*******\n"
            "Premise: " + ex.question["premises_text"] + "\n*******\n\n*******\nConclusion: "
            + ex.question["conclusion_text"] + "\n*******<think>\n")


TEMPLATES = {"rqbench": Template(_rqbench_prompt),
             "quantlrm": Template(_quantlrm_prompt, raw=True,
                                  source="psunlpgroup/QuantLRM inference_vllm.py (yale-nlp/FOLIO loop)")}


@dataclass
class FolioConfig(TaskConfig):
    template: str = "rqbench"     # rqbench | quantlrm (raw, ends "*******<think>\n")


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
    TEMPLATES = TEMPLATES
    SOURCES = ("hub", "quantlrm")     # quantlrm: the same yale-nlp/FOLIO validation split (inference_vllm.py)
    folio_version: str | None = None      # "v2" | "v0.0", from the rows' layout once loaded

    def result_info(self) -> dict:
        return {**super().result_info(), "folio_version": self.folio_version}

    def load(self) -> list[Example]:
        rows, source = self.records(HUB_ID, None, HUB_SPLIT)
        layouts = {"v2" if isinstance(r.get("premises"), str) else "v0.0" for r in rows}
        self.folio_version = "+".join(sorted(layouts)) or None
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
            premises = r["premises"]
            raw = premises if isinstance(premises, str) else "\n".join(map(str, premises))   # v0.0: a list
            out.append(Example(id=str(ex_id), gold=label,
                               meta={"label": label, "folio_version": "v2" if isinstance(premises, str) else "v0.0"},
                               question={"premises": _premises(premises, where),
                                         "conclusion": str(r["conclusion"]).strip(),
                                         "premises_text": raw, "conclusion_text": str(r["conclusion"])}))
        return out

    def example_for(self, answer, choices=None, ex_id: str = "") -> Example:
        label = LABEL_ALIASES.get(str(answer).strip().lower())
        if label is None:
            raise UserError(f"answer={answer!r} is not allowed for {ex_id or 'a row'}; allowed: {', '.join(LABELS)}")
        return Example(id=ex_id, question="", gold=label, meta={"label": label})

    def grade(self, ex: Example, answer_text: str) -> Score:
        """Judge a final-answer text (reasoning already stripped)."""
        return grade_choice(answer_text, ex.gold, LABELS, ignore_case=True)

    def grade_lighteval(self, ex: Example, text: str) -> Score:
        """No paper graded FOLIO with lighteval (QuantLRM ships no scorer): math-verify's string rule."""
        return lighteval_label(text, ex.gold, LABELS)
