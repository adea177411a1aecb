"""AIME-120: AIME 2022-2024 (AIME-90) + AIME 2025, integer answers 0-999, graded by math-verify.

Sources (`task.source`), as each paper's code loads them:
- qrm: "Quantization Hurts Reasoning?" (arXiv 2504.04823): AIME-90 (`xiaoyuanliu/AIME90`, split train) plus
  AIME 2025 (`yentinglin/aime_2025`, split train), fields problem/answer (QRM reasoning.py: aime90, aime25).
- quantlrm: `ChuGyouk/AIME-22-25` split train, field `problem` (QuantLRM inference_vllm.py); its answer field is
  read as `answer` -- not verified (the hub card could not be read here).
- aime2024: AIME 2024 alone, for SliderQuant Table 5: the 2024 problems of `xiaoyuanliu/AIME90` (QRM's aime24
  task reads Maxwell-Jia/AIME_2024 locally; same contest problems).
One local file (task.data_files) replaces the download of any source.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from harness.registry import register_task
from harness.scoring import grade_math, lighteval_math
from harness.tasks_base import BaseTask, TaskConfig, Template, load_hub_records, read_local_records
from harness.types import Example, Score, UserError
from tasks.math500 import QRM_MATH, RQBENCH_MATH

# (hub id, split, source key used in example ids, the years it holds, year when a record does not say)
AIME90 = ("xiaoyuanliu/AIME90", "train", "aime90", {2022, 2023, 2024}, None)
AIME25 = ("yentinglin/aime_2025", "train", "aime25", {2025}, 2025)
AIME22_25 = ("ChuGyouk/AIME-22-25", "train", "aime22_25", {2022, 2023, 2024, 2025}, None)
HUBS = {"qrm": (AIME90, AIME25), "quantlrm": (AIME22_25,), "aime2024": (AIME90,)}
# psunlpgroup/QuantLRM inference_vllm.py: total_input.append(d['problem'] + "\n<think>\n")
QUANTLRM_AIME = Template(lambda ex: ex.question + "\n<think>\n", raw=True,
                         source="psunlpgroup/QuantLRM inference_vllm.py (ChuGyouk/AIME-22-25 loop)")
SUBSETS = {"all": None, "aime22": {2022}, "aime23": {2023}, "aime24": {2024}, "aime25": {2025},
           "aime90": {2022, 2023, 2024}}


@dataclass
class Aime120Config(TaskConfig):
    subset: str = "all"                       # all | aime22 | aime23 | aime24 | aime25 | aime90 (2022-24)
    revision_aime25: Optional[str] = None     # hub revision of yentinglin/aime_2025 (`revision` is AIME90's)
    template: str = "qrm"                     # qrm | quantlrm (raw, ends "\n<think>\n") | rqbench
    source: str = "qrm"                       # qrm | quantlrm | aime2024


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
    TEMPLATES = {"qrm": QRM_MATH, "quantlrm": QUANTLRM_AIME, "rqbench": RQBENCH_MATH}
    SOURCES = tuple(HUBS)

    def __init__(self, cfg: Aime120Config):
        super().__init__(cfg)
        if cfg.subset not in SUBSETS:
            raise UserError(f"task.subset={cfg.subset!r} is not allowed; allowed: {', '.join(SUBSETS)}")
        if cfg.source == "aime2024":
            if cfg.subset not in ("all", "aime24"):
                raise UserError(f"task.subset={cfg.subset!r} is not allowed with task.source=aime2024 (AIME 2024 "
                                f"only); allowed: all, aime24")
            cfg.subset = "aime24"       # so the run, its directory and the report say AIME-2024, not AIME-120

    def _records(self) -> list[tuple[str, int, dict, int | None]]:
        """(source, index, record, default year) for every record, local or hub."""
        cfg = self.cfg
        if cfg.data_files:
            return [("task.data_files", i, r, None) for i, r in enumerate(read_local_records(cfg.data_files))]
        years = SUBSETS[cfg.subset]
        out = []
        for hub in HUBS[cfg.source]:
            (hub_id, split, key, holds, default), rev = hub, (cfg.revision_aime25 if hub is AIME25 else cfg.revision)
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

    def example_for(self, answer, choices=None, ex_id: str = "") -> Example:
        return Example(id=ex_id, question="", gold=_gold(answer, f"answer of {ex_id or 'a row'}"))

    def grade(self, ex: Example, answer_text: str) -> Score:
        """Judge a final-answer text (reasoning already stripped)."""
        return grade_math(answer_text, ex.gold)

    def grade_lighteval(self, ex: Example, text: str) -> Score:
        """QRM's aime metrics: Expr gold extraction (reasoning.py: expr_gold_metric)."""
        return lighteval_math(text, ex.gold, "expr")
