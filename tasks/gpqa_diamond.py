"""GPQA-Diamond: 198 graduate-level multiple-choice science questions, scored by the chosen letter.

The data lists the correct answer first, so every evaluator shuffles it in; here the correct
answer's position comes from an RNG seeded by (question id, run seed), so a run is reproducible,
different seeds see different placements, and the placement is recorded in Example.meta.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from harness.registry import register_task
from harness.scoring import grade_choice
from harness.tasks_base import BaseTask, TaskConfig, load_hub_records, read_local_records
from harness.types import Example, Score, UserError

HUB_ID, HUB_CONFIG, HUB_SPLIT = "Idavidrein/gpqa", "gpqa_diamond", "train"
LETTERS = ("A", "B", "C", "D")
ANSWER_FIELDS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
# simple-evals' multiple-choice prompt (used by the papers this harness reproduces).
TEMPLATE = ("Answer the following multiple choice question. The last line of your response should be of the "
            "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. "
            "Think step by step before answering.\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}")


@dataclass
class GpqaDiamondConfig(TaskConfig):
    seed: int = 0             # the run seed (the YAML sets ${seed}); decides where the correct answer goes


def place_correct(question_id: str, seed: int) -> int:
    """Index (0-3) of the correct answer: a pure function of (question id, run seed)."""
    # random.Random seeded with a str hashes it with SHA-512: stable across processes and Python hash seeds.
    return random.Random(f"gpqa\x1f{question_id}\x1f{seed}").randrange(len(LETTERS))


def _present(value) -> bool:
    """Not missing: None, "" and the NaN pandas puts in empty csv/parquet cells all count as missing."""
    return value is not None and value == value and str(value).strip() != ""


def _question_id(row: dict) -> str:
    for key in ("Record ID", "id"):
        if _present(row.get(key)):
            return str(row[key])
    # No id column (a hand-made local file): the question text itself identifies the question.
    return "q-" + hashlib.sha256(str(row["Question"]).encode()).hexdigest()[:12]


@register_task("gpqa_diamond")
class GpqaDiamondTask(BaseTask):
    Config = GpqaDiamondConfig
    breakdown_keys = ("domain",)

    def _rows(self) -> tuple[str, list[dict]]:
        cfg = self.cfg
        if cfg.data_files:
            return "task.data_files", read_local_records(cfg.data_files)
        try:
            return HUB_ID, load_hub_records(HUB_ID, HUB_CONFIG, HUB_SPLIT, cfg.revision, self.name)
        except UserError as e:
            raise UserError(
                f"{e}\n  GPQA is gated: accept its terms at https://huggingface.co/datasets/{HUB_ID} while logged in, "
                f"then run `hf auth login` on this machine; or pass task.data_files=<your local copy "
                f"(csv/jsonl/parquet with Question, Correct Answer, Incorrect Answer 1..3)>") from None

    def load(self) -> list[Example]:
        source, rows = self._rows()
        out = []
        for i, r in enumerate(rows):
            missing = [k for k in ("Question", *ANSWER_FIELDS) if k not in r]
            if missing:
                raise UserError(f"{source} record {i}: missing field(s) {', '.join(missing)}; a GPQA record needs "
                                f"Question, {', '.join(ANSWER_FIELDS)}")
            qid = _question_id(r)
            gold_pos = place_correct(qid, self.cfg.seed)
            order = list(ANSWER_FIELDS[1:])
            order.insert(gold_pos, ANSWER_FIELDS[0])   # incorrect answers keep their relative order
            choices = [str(r[k]).strip() for k in order]
            domain = r.get("High-level domain")
            out.append(Example(
                id=qid, question={"question": str(r["Question"]).strip(), "choices": choices},
                gold=LETTERS[gold_pos],
                meta={"domain": str(domain) if _present(domain) else "unknown", "gold_letter": LETTERS[gold_pos],
                      "choice_order": order}))
        return out

    def prompt_text(self, ex: Example) -> str:
        return TEMPLATE.format(question=ex.question["question"], **dict(zip(LETTERS, ex.question["choices"])))

    def grade(self, ex: Example, answer_text: str) -> Score:
        """Judge a final-answer text (reasoning already stripped)."""
        return grade_choice(answer_text, ex.gold, LETTERS)
