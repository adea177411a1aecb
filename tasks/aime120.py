"""AIME-120: AIME 2022-2024 (AIME-90) + AIME 2025, integer answers 0-999, graded by math-verify.

"Quantization Hurts Reasoning?" (arXiv 2504.04823) evaluates on AIME-90 (`xiaoyuanliu/AIME90`)
plus AIME 2025 (`yentinglin/aime_2025`). One local file with all 120 problems works as well.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from harness.registry import register_task
from harness.scoring import grade_math
from harness.tasks_base import BaseTask, TaskConfig, load_hub_records, read_local_records
from harness.types import Example, Score, UserError
from tasks.math500 import MATH_INSTRUCTION

# (hub id, split, source key used in example ids, the years it holds, year when a record does not say)
AIME90 = ("xiaoyuanliu/AIME90", "train", "aime90", {2022, 2023, 2024}, None)
AIME25 = ("yentinglin/aime_2025", "train", "aime25", {2025}, 2025)
SUBSETS = {"all": None, "aime22": {2022}, "aime23": {2023}, "aime24": {2024}, "aime25": {2025},
           "aime90": {2022, 2023, 2024}}


@dataclass
class Aime120Config(TaskConfig):
    subset: str = "all"                       # all | aime22 | aime23 | aime24 | aime25 | aime90 (2022-24)
    revision_aime25: Optional[str] = None     # hub revision of yentinglin/aime_2025 (`revision` is AIME90's)


def _year(row: dict, default: int | None) -> int | None:
    """The contest year: a `year` field, else a 20xx in the id or AoPS url ("2024_AIME_I_Problems")."""
    if row.get("year") not in (None, ""):
        return int(str(row["year"]).strip()[:4])
    for key in ("id", "url"):
        m = re.search(r"(?<!\d)(20\d\d)(?!\d)", str(row.get(key, "")))
        if m:
            return int(m.group(1))
    return default


def _gold(value, where: str) -> str:
    """AIME answers are integers 0-999; copies differ in leading zeros ("025"), so normalise."""
    text = str(value).strip()
    if not text.isdigit() or not 0 <= int(text) <= 999:
        raise UserError(f"{where}: answer={value!r} is not an AIME answer; allowed: an integer 0..999")
    return str(int(text))


@register_task("aime120")
class Aime120Task(BaseTask):
    Config = Aime120Config
    breakdown_keys = ("year",)

    def __init__(self, cfg: Aime120Config):
        super().__init__(cfg)
        if cfg.subset not in SUBSETS:
            raise UserError(f"task.subset={cfg.subset!r} is not allowed; allowed: {', '.join(SUBSETS)}")

    def _records(self) -> list[tuple[str, int, dict, int | None]]:
        """(source, index, record, default year) for every record, local or hub."""
        cfg = self.cfg
        if cfg.data_files:
            return [("task.data_files", i, r, None) for i, r in enumerate(read_local_records(cfg.data_files))]
        years = SUBSETS[cfg.subset]
        out = []
        for (hub_id, split, key, holds, default), rev in ((AIME90, cfg.revision), (AIME25, cfg.revision_aime25)):
            if years is not None and not years & holds:
                continue      # only download what the subset needs
            rows = load_hub_records(hub_id, None, split, rev, self.name)
            out += [(key, i, r, default) for i, r in enumerate(rows)]
        return out

    def load(self) -> list[Example]:
        years = SUBSETS[self.cfg.subset]
        out = []
        for source, i, r, default in self._records():
            where = f"{source} record {i}"
            problem = r.get("problem", r.get("question"))
            if problem is None or "answer" not in r:
                raise UserError(f"{where}: an AIME record needs 'problem' (or 'question') and 'answer'; "
                                f"fields present: {', '.join(r)}")
            year = _year(r, default)
            if years is not None and year is None:
                raise UserError(f"{where}: cannot tell its year (no 'year' field, no 20xx in 'id' or 'url'), "
                                f"so task.subset={self.cfg.subset!r} cannot filter it; use task.subset=all")
            if years is not None and year not in years:
                continue
            rid = r.get("id", i)
            ex_id = str(rid) if source == "task.data_files" else f"{source}/{rid}"
            out.append(Example(id=ex_id, question=problem, gold=_gold(r["answer"], where),
                               meta={"year": year if year is not None else "unknown"}))
        return out

    def prompt_text(self, ex: Example) -> str:
        return f"{ex.question}\n{MATH_INSTRUCTION}"

    def grade(self, ex: Example, answer_text: str) -> Score:
        """Judge a final-answer text (reasoning already stripped)."""
        return grade_math(answer_text, ex.gold)
