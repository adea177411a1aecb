"""MATH-500 (Lightman et al. 2023): 500 competition problems, graded by math-verify equivalence."""
from __future__ import annotations

from dataclasses import dataclass

from harness.registry import register_task
from harness.scoring import grade_math, lighteval_math
from harness.tasks_base import BaseTask, TaskConfig, Template
from harness.types import Example, Score, UserError

HUB_ID, HUB_SPLIT = "HuggingFaceH4/MATH-500", "test"
TRAIN_HUB_ID = "AI-MO/NuminaMath-1.5"       # training prompts (train_examples), as harness.calib's reasoning default
# The DeepSeek-R1 / "Quantization Hurts Reasoning?" instruction for math problems.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
FIELDS = ("problem", "answer", "subject", "level", "unique_id")
# ruikangliu/Quantized-Reasoning-Models lighteval_custom/tasks/reasoning.py, prompt_fn / aime25_prompt_fn:
#   query=f"{line["problem"]}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
QRM_MATH = Template(lambda ex: f"{ex.question}\n\n{MATH_INSTRUCTION}",
                    source="ruikangliu/Quantized-Reasoning-Models lighteval_custom/tasks/reasoning.py: prompt_fn")
# rqbench before templates existed: one newline before the instruction.
RQBENCH_MATH = Template(lambda ex: f"{ex.question}\n{MATH_INSTRUCTION}")


@dataclass
class Math500Config(TaskConfig):
    template: str = "qrm"       # qrm: "\n\n" before the instruction, as the papers | rqbench: one "\n"


def _level(value, where: str) -> int:
    """Levels come as 3 or "Level 3" depending on the copy of the data."""
    text = str(value).removeprefix("Level").strip()
    if not text.isdigit():
        raise UserError(f"{where}: level={value!r} is not a MATH level; allowed: 1..5 or 'Level N'")
    return int(text)


@register_task("math500")
class Math500Task(BaseTask):
    Config = Math500Config
    breakdown_keys = ("subject", "level")
    TEMPLATES = {"qrm": QRM_MATH, "rqbench": RQBENCH_MATH}
    SOURCES = ("hub", "qrm")      # qrm: the same hub set (QRM reasoning.py: ./datasets/MATH-500 = HuggingFaceH4/MATH-500)

    def load(self) -> list[Example]:
        rows, source = self.records(HUB_ID, None, HUB_SPLIT)
        out = []
        for i, r in enumerate(rows):
            missing = [k for k in FIELDS if k not in r]
            if missing:
                raise UserError(f"{source} record {i}: missing field(s) {', '.join(missing)}; "
                                f"a MATH-500 record needs {', '.join(FIELDS)}")
            out.append(Example(id=str(r["unique_id"]), question=r["problem"], gold=str(r["answer"]),
                               meta={"subject": r["subject"], "level": _level(r["level"], f"{source} record {i}")}))
        return out

    def train_examples(self, n: int, seed: int = 0) -> list[Example]:
        """n training problems of the task's domain for methods that train (Reasoning-QAT's traces, GRPO
        prompts): NuminaMath-1.5 (calib=reasoning's default prompt set) rows with an answer, MATH-500's own
        problems left out, in a seeded order."""
        import random
        from harness.tasks_base import load_hub_records
        held = {ex.question.strip() for ex in self.load()}
        rows = [r for r in load_hub_records(TRAIN_HUB_ID, None, "train", None, self.name)
                if str(r.get("answer") or "").strip() and str(r.get("problem", "")).strip() not in held]
        picked = random.Random(f"train-{seed}").sample(rows, min(n, len(rows)))
        return [Example(id=f"train-{i}", question=r["problem"], gold=str(r["answer"])) for i, r in enumerate(picked)]

    def grade(self, ex: Example, answer_text: str) -> Score:
        """Judge a final-answer text (reasoning already stripped)."""
        return grade_math(answer_text, ex.gold)

    def grade_lighteval(self, ex: Example, text: str) -> Score:
        """QRM's math_500 metric: LaTeX gold extraction (reasoning.py: latex_gold_metric)."""
        return lighteval_math(text, ex.gold, "latex")
