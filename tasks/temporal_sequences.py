"""BIG-Bench Hard temporal_sequences: when could someone have visited a place? Scored by option letter.

Templates (`task.template`):
- rqbench: zero-shot chain of thought (reasoning models); `task.fewshot=1..3` prepends that many of OUR OWN
  worked exemplars (not BBH's) in the BBH "Q: ... A: Let's think step by step." style.
- bbh: BBH's official 3-shot CoT prompt (suzgunmirac/BIG-Bench-Hard cot-prompts/temporal_sequences.txt), read
  from the copy lm-evaluation-harness ships (lm_eval/tasks/bbh/cot_fewshot/temporal_sequences.yaml), in the
  format of the BBH repo's code-davinci-002 outputs: prompt + "\n\nQ: " + input + "\nA: Let's think step by step."
- quantlrm: QuantLRM's raw prompt (psunlpgroup/QuantLRM inference_vllm.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from functools import lru_cache

from harness.registry import register_task
from harness.scoring import cut_at_next_question, grade_choice, lighteval_letter
from harness.tasks_base import BaseTask, TaskConfig, Template
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


@lru_cache(maxsize=1)
def bbh_cot_prompt() -> str:
    """BBH's official 3-shot CoT prompt for temporal_sequences, rebuilt from lm-eval's task YAML (description,
    then "Q: {input}\\nA: Let's think step by step.\\n{target}" per exemplar, joined by blank lines)."""
    import os

    import yaml
    import lm_eval
    path = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "bbh", "cot_fewshot", "temporal_sequences.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            y = yaml.safe_load(f)
        shots = y["fewshot_config"]["samples"]
        description = y["description"].rstrip("\n")
    except (OSError, KeyError, TypeError) as e:
        raise UserError(f"task.template=bbh: could not read BBH's CoT prompt from {path} ({type(e).__name__}: {e}); "
                        f"it ships with lm-eval (pip install lm-eval)") from None
    return "\n\n".join([description] + [f"Q: {s['input']}\nA: Let's think step by step.\n{s['target']}"
                                         for s in shots])


def _bbh(ex: Example) -> str:
    return f"{bbh_cot_prompt()}\n\nQ: {ex.question}\nA: Let's think step by step."


# psunlpgroup/QuantLRM inference_vllm.py (temporal_sequences.json loop):
#   "Use the timeline provided and answer step by step. Finally give the index (the letter) of the actual correct
#   answer.\n" + d['input'] + "\n<think>\n"
def _quantlrm(ex: Example) -> str:
    return ("Use the timeline provided and answer step by step. Finally give the index (the letter) of the actual "
            "correct answer.\n" + ex.question + "\n<think>\n")


@dataclass
class TemporalSequencesConfig(TaskConfig):
    fewshot: int = 0          # template rqbench: 0: zero-shot CoT; 1..3: that many of our worked exemplars first
    template: str = "rqbench"     # rqbench | bbh (official 3-shot CoT) | quantlrm (raw, ends "\n<think>\n")


def option_letters(question: str) -> list[str]:
    """The letters of the "(X) ..." option lines of a BBH question."""
    return re.findall(r"^\(([A-Z])\)", question, flags=re.MULTILINE)


@register_task("temporal_sequences")
class TemporalSequencesTask(BaseTask):
    Config = TemporalSequencesConfig
    # quantlrm: BBH's temporal_sequences.json (inference_vllm.py reads a local copy): the same 250 records
    SOURCES = ("hub", "quantlrm")

    def __init__(self, cfg: TemporalSequencesConfig):
        self.TEMPLATES = {"rqbench": Template(self._rqbench), "quantlrm": Template(_quantlrm, raw=True),
                          "bbh": Template(_bbh, source="lm_eval/tasks/bbh/cot_fewshot/temporal_sequences.yaml")}
        super().__init__(cfg)
        if not 0 <= cfg.fewshot <= len(EXEMPLARS):
            raise UserError(f"task.fewshot={cfg.fewshot!r} is not allowed; allowed: 0..{len(EXEMPLARS)}")
        if cfg.fewshot and cfg.template != "rqbench":
            raise UserError(f"task.fewshot={cfg.fewshot} applies to task.template=rqbench only (our exemplars); "
                            f"task.template={cfg.template} has its own shots; allowed: task.fewshot=0")

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

    def _rqbench(self, ex: Example) -> str:
        if self.cfg.fewshot == 0:
            return f"{ex.question}\n\n{ZERO_SHOT}"
        shots = "\n\n".join(f"Q: {q}\nA: Let's think step by step.\n{a}" for q, a in EXEMPLARS[: self.cfg.fewshot])
        return f"{DESCRIPTION}\n\n{shots}\n\nQ: {ex.question}\nA: Let's think step by step."

    def example_for(self, answer, choices=None, ex_id: str = "") -> Example:
        """`answer`: "(X)" or "X"; `choices`: the option letters (or texts: their number sets A..), default A-D."""
        letters = [str(c).strip("() ") for c in choices] if choices and all(
            re.fullmatch(r"\(?[A-Z]\)?", str(c).strip()) for c in choices) else (
            list("ABCDEFGHIJKLMNOPQR"[: len(choices)]) if choices else ["A", "B", "C", "D"])
        m = re.fullmatch(r"\(?([A-Z])\)?", str(answer).strip())
        if m is None or m.group(1) not in letters:
            raise UserError(f"answer={answer!r} is not allowed for {ex_id or 'a row'}; allowed: "
                            f"{', '.join(f'({x})' for x in letters)}")
        return Example(id=ex_id, question="", gold=f"({m.group(1)})", meta={"options": letters})

    def grade(self, ex: Example, answer_text: str) -> Score:
        """Judge a final-answer text (reasoning already stripped); an invented next "Q:" is cut off."""
        s = grade_choice(cut_at_next_question(answer_text), ex.gold.strip("()"), ex.meta["options"])
        s.parsed = f"({s.parsed})" if s.parsed else None
        return s

    def grade_lighteval(self, ex: Example, text: str) -> Score:
        """No paper graded this with lighteval: lighteval's GPQA letter rule (NativeLetters) over the whole
        completion, after cutting an invented next "Q:" (what a few-shot stop sequence does)."""
        s = lighteval_letter(cut_at_next_question(text), ex.gold.strip("()"), ex.meta["options"])
        s.parsed = f"({s.parsed})" if s.parsed else None
        return s
