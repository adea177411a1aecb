"""BIG-Bench Hard temporal_sequences: when could someone have visited a place? Scored by option letter.

Zero-shot chain of thought by default (reasoning models); `task.fewshot=1..3` prepends that many
worked exemplars in the BBH "Q: ... A: Let's think step by step." style. The exemplars below are
our own (not BBH's); they use the same puzzle structure so the format carries over.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from harness.registry import register_task
from harness.scoring import cut_at_next_question, grade_choice
from harness.tasks_base import BaseTask, TaskConfig
from harness.types import Example, Score, UserError

HUB_ID, HUB_CONFIG, HUB_SPLIT = "lukaemon/bbh", "temporal_sequences", "test"
DESCRIPTION = "Work out during which interval a person could have visited a place, given who saw them where."
ZERO_SHOT = ("Think step by step about when the person was free. Finish your response with "
             "\"So the answer is (X).\" where X is the letter of the correct option.")

# (question, reasoning ending in "So the answer is (X).") -- the free slot sits in the middle, at the
# start and at the end of the day, and the answers are (C), (B), (D), so no position is favoured.
EXEMPLARS = (
    ("Today, Marcus went to the bookstore. Between what times could they have gone?\n"
     "We know that:\nMarcus woke up at 8am.\nOlivia saw Marcus jogging in the park from 8am to 10am.\n"
     "Henry saw Marcus repairing a bicycle at the garage from 10am to 11am.\n"
     "Priya saw Marcus eating at the noodle bar from 2pm to 4pm.\n"
     "Daniel saw Marcus swimming at the community pool from 4pm to 7pm.\n"
     "The bookstore was closed after 7pm.\n"
     "Between what times could Marcus have gone to the bookstore?\n"
     "Options:\n(A) 10am to 11am\n(B) 4pm to 7pm\n(C) 11am to 2pm\n(D) 8am to 10am",
     "Marcus is awake from 8am.\n8am-10am: seen jogging in the park.\n10am-11am: seen repairing a bicycle.\n"
     "11am-2pm: nobody saw Marcus.\n2pm-4pm: seen eating at the noodle bar.\n"
     "4pm-7pm: seen swimming at the community pool.\nThe bookstore closes at 7pm.\n"
     "Marcus was unaccounted for only from 11am to 2pm, so that is when he could have gone to the bookstore. "
     "So the answer is (C)."),
    ("Today, Hannah went to the art gallery. Between what times could they have gone?\n"
     "We know that:\nHannah woke up at 6am.\nKevin saw Hannah waiting at the bus stop from 9am to 12pm.\n"
     "Rosa saw Hannah painting a fence at the farm from 12pm to 3pm.\n"
     "Tom saw Hannah reading in the town square from 3pm to 5pm.\n"
     "The art gallery was closed after 5pm.\n"
     "Between what times could Hannah have gone to the art gallery?\n"
     "Options:\n(A) 12pm to 3pm\n(B) 6am to 9am\n(C) 3pm to 5pm\n(D) 9am to 12pm",
     "Hannah is awake from 6am.\n6am-9am: nobody saw Hannah.\n9am-12pm: seen waiting at the bus stop.\n"
     "12pm-3pm: seen painting a fence at the farm.\n3pm-5pm: seen reading in the town square.\n"
     "The art gallery closes at 5pm.\n"
     "Hannah was unaccounted for only from 6am to 9am, so that is when she could have gone to the art gallery. "
     "So the answer is (B)."),
    ("Today, Victor went to the bakery. Between what times could they have gone?\n"
     "We know that:\nVictor woke up at 9am.\nLena saw Victor washing a car at the car wash from 9am to 11am.\n"
     "Omar saw Victor playing chess at the club from 11am to 1pm.\n"
     "Grace saw Victor studying at the university from 1pm to 5pm.\n"
     "Felix saw Victor buying shoes at the market from 5pm to 6pm.\n"
     "The bakery was closed after 8pm.\n"
     "Between what times could Victor have gone to the bakery?\n"
     "Options:\n(A) 11am to 1pm\n(B) 1pm to 5pm\n(C) 9am to 11am\n(D) 6pm to 8pm",
     "Victor is awake from 9am.\n9am-11am: seen washing a car.\n11am-1pm: seen playing chess at the club.\n"
     "1pm-5pm: seen studying at the university.\n5pm-6pm: seen buying shoes at the market.\n"
     "6pm-8pm: nobody saw Victor.\nThe bakery closes at 8pm.\n"
     "Victor was unaccounted for only from 6pm to 8pm, so that is when he could have gone to the bakery. "
     "So the answer is (D)."),
)


@dataclass
class TemporalSequencesConfig(TaskConfig):
    fewshot: int = 0          # 0: zero-shot CoT; 1..3: that many of our worked exemplars first


def option_letters(question: str) -> list[str]:
    """The letters of the "(X) ..." option lines of a BBH question."""
    return re.findall(r"^\(([A-Z])\)", question, flags=re.MULTILINE)


@register_task("temporal_sequences")
class TemporalSequencesTask(BaseTask):
    Config = TemporalSequencesConfig

    def __init__(self, cfg: TemporalSequencesConfig):
        super().__init__(cfg)
        if not 0 <= cfg.fewshot <= len(EXEMPLARS):
            raise UserError(f"task.fewshot={cfg.fewshot!r} is not allowed; allowed: 0..{len(EXEMPLARS)}")

    def load(self) -> list[Example]:
        rows, source = self.records(HUB_ID, HUB_CONFIG, HUB_SPLIT)
        out = []
        for i, r in enumerate(rows):
            where = f"{source} record {i}"
            if "input" not in r or "target" not in r:
                raise UserError(f"{where}: a BBH record needs 'input' and 'target'; fields present: {', '.join(r)}")
            letters = option_letters(r["input"]) or ["A", "B", "C", "D"]
            m = re.fullmatch(r"\(?([A-Z])\)?", str(r["target"]).strip())
            if m is None or m.group(1) not in letters:
                raise UserError(f"{where}: target={r['target']!r} is not allowed; allowed: "
                                f"{', '.join(f'({x})' for x in letters)}")
            idx = r.get("idx", i)
            out.append(Example(id=f"temporal_sequences/{idx}", question=r["input"], gold=f"({m.group(1)})",
                               meta={"options": letters}))
        return out

    def prompt_text(self, ex: Example) -> str:
        if self.cfg.fewshot == 0:
            return f"{ex.question}\n\n{ZERO_SHOT}"
        shots = "\n\n".join(f"Q: {q}\nA: Let's think step by step.\n{a}" for q, a in EXEMPLARS[: self.cfg.fewshot])
        return f"{DESCRIPTION}\n\n{shots}\n\nQ: {ex.question}\nA: Let's think step by step."

    def grade(self, ex: Example, answer_text: str) -> Score:
        """Judge a final-answer text (reasoning already stripped); an invented next "Q:" is cut off."""
        s = grade_choice(cut_at_next_question(answer_text), ex.gold.strip("()"), ex.meta["options"])
        s.parsed = f"({s.parsed})" if s.parsed else None
        return s
