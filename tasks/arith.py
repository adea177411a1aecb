"""The toy's task: chained integer arithmetic, held-out problems.

Strict: exact match of the last \\boxed{} after </think>. Lighteval-compatible (`acc`): the integer gold graded
as QRM grades AIME (Expr gold, boxed-first prediction extraction over the whole completion).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from harness.registry import register_task
from harness.scoring import last_boxed, lighteval_math
from harness.tasks_base import BaseTask, SamplingDefaults, TaskConfig
from harness.toy import arith
from harness.types import Example, Score


@dataclass
class ArithConfig(TaskConfig):
    n_problems: int = 500                 # size of the held-out split evaluated
    split_seed: int = 0                   # which held-out problems (independent of the run seed)
    sampling: SamplingDefaults = field(
        default_factory=lambda: SamplingDefaults(temperature=0.0, top_p=1.0, max_new_tokens=128))


@register_task("arith")
class ArithTask(BaseTask):
    Config = ArithConfig
    breakdown_keys = ("n_terms",)

    def load(self) -> list[Example]:
        return [Example(id=f"arith-{i}", question=p.question(), gold=str(p.answer),
                        meta={"n_terms": len(p.terms)})
                for i, p in enumerate(arith.problems("test", self.cfg.n_problems, self.cfg.split_seed))]

    def train_examples(self, n: int, seed: int = 0) -> list[Example]:
        """n problems of the *training* split (never the evaluated one), for methods that train on the
        task's domain (Reasoning-QAT's traces and GRPO prompts); a stream apart from calib=toy's."""
        return [Example(id=f"arith-train-{i}", question=p.question(), gold=str(p.answer))
                for i, p in enumerate(arith.problems("train", n, f"task-{seed}"))]

    def prompt_text(self, ex: Example) -> str:
        return ex.question

    def grade(self, ex: Example, answer_text: str) -> Score:
        parsed = last_boxed(answer_text)
        return Score(correct=parsed is not None and parsed == ex.gold, parsed=parsed)

    def grade_lighteval(self, ex: Example, text: str) -> Score:
        return lighteval_math(text, ex.gold, "expr")
