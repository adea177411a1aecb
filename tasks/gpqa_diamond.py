"""GPQA-Diamond: 198 graduate-level multiple-choice science questions, scored by the chosen letter.

Sources (`task.source`):
- rqbench: `Idavidrein/gpqa` (config gpqa_diamond, split train); the correct answer's position comes from an
  RNG seeded by (question id, run seed): reproducible, independent of row order, recorded in Example.meta.
- qrm: the same data, placed as "Quantization Hurts Reasoning?" places it: `random.seed(seed)` (inference.py
  main) then one `random.randint(0, 3)` per row in dataset order (lighteval_custom/tasks/reasoning.py
  gpqa_prompt_fn). Reproduced exactly if nothing else draws from Python's global RNG in between, which we
  could not check by running their code (vLLM may reseed it in-process).
- quantlrm: `fingertap/GPQA-Diamond` split test, in its fixed order: `question` already holds the options,
  `answer` the letter (QuantLRM inference_vllm.py reads `question`; `answer` is read by other users of the
  dataset -- not verified from its card).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from harness.registry import register_task
from harness.scoring import grade_choice, lighteval_letter
from harness.tasks_base import BaseTask, TaskConfig, Template, load_hub_records, read_local_records
from harness.types import Example, Score, UserError

HUB_ID, HUB_CONFIG, HUB_SPLIT = "Idavidrein/gpqa", "gpqa_diamond", "train"
QUANTLRM_HUB, QUANTLRM_SPLIT = "fingertap/GPQA-Diamond", "test"
LETTERS = ("A", "B", "C", "D")
ANSWER_FIELDS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
# simple-evals' multiple-choice prompt, byte for byte as ruikangliu/Quantized-Reasoning-Models
# lighteval_custom/tasks/reasoning.py gpqa_prompt_fn `query_template` (fields unstripped).
TEMPLATE = ("Answer the following multiple choice question. The last line of your response should be of the "
            "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. "
            "Think step by step before answering.\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}")


def _simple_evals(ex: Example, strip: bool) -> str:
    clean = (lambda t: t.strip()) if strip else (lambda t: t)
    q = ex.question
    if "choices" not in q:
        raise UserError("task.template=qrm/rqbench needs the Idavidrein/gpqa layout (Question, Correct Answer, "
                        "Incorrect Answer 1..3); task.source=quantlrm rows only fit task.template=quantlrm")
    return TEMPLATE.format(question=clean(q["question"]), **{k: clean(c) for k, c in zip(LETTERS, q["choices"])})


TEMPLATES = {
    "qrm": Template(lambda ex: _simple_evals(ex, strip=False),
                    source="ruikangliu/Quantized-Reasoning-Models lighteval_custom/tasks/reasoning.py: gpqa_prompt_fn"),
    # psunlpgroup/QuantLRM inference_vllm.py:
    #   "Answer the question by giving the index (the letter) of the actual correct answer.\n" + d['question'] + "\n<think>\n"
    "quantlrm": Template(lambda ex: "Answer the question by giving the index (the letter) of the actual correct "
                                   "answer.\n" + ex.question["question"] + "\n<think>\n", raw=True,
                        source="psunlpgroup/QuantLRM inference_vllm.py (fingertap/GPQA-Diamond loop)"),
    "rqbench": Template(lambda ex: _simple_evals(ex, strip=True)),     # the same prompt, fields stripped
}


@dataclass
class GpqaDiamondConfig(TaskConfig):
    seed: int = 0             # the run seed (the YAML sets ${seed}); decides where the correct answer goes
    template: str = "qrm"     # qrm | quantlrm (raw, ends "\n<think>\n") | rqbench
    source: str = "rqbench"   # rqbench (placement by question id + seed) | qrm (random.seed(seed)) | quantlrm


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
    TEMPLATES = TEMPLATES
    SOURCES = ("rqbench", "qrm", "quantlrm")

    def __init__(self, cfg: GpqaDiamondConfig):
        super().__init__(cfg)
        if (cfg.source == "quantlrm") != (cfg.template == "quantlrm"):
            raise UserError(f"task.template={cfg.template!r} does not fit task.source={cfg.source!r}: "
                            f"fingertap/GPQA-Diamond rows carry their options inside `question` and fit only the "
                            f"quantlrm template; allowed: task.source=quantlrm with task.template=quantlrm, or "
                            f"task.source=rqbench|qrm with task.template=qrm|rqbench")

    def _rows(self) -> tuple[str, list[dict]]:
        cfg = self.cfg
        if cfg.data_files:
            return "task.data_files", read_local_records(cfg.data_files)
        if cfg.source == "quantlrm":
            return QUANTLRM_HUB, load_hub_records(QUANTLRM_HUB, None, QUANTLRM_SPLIT, cfg.revision, self.name)
        try:
            return HUB_ID, load_hub_records(HUB_ID, HUB_CONFIG, HUB_SPLIT, cfg.revision, self.name)
        except UserError as e:
            raise UserError(
                f"{e}\n  GPQA is gated: accept its terms at https://huggingface.co/datasets/{HUB_ID} while logged in, "
                f"then run `hf auth login` on this machine; or pass task.data_files=<your local copy "
                f"(csv/jsonl/parquet with Question, Correct Answer, Incorrect Answer 1..3)>") from None

    def load(self) -> list[Example]:
        source, rows = self._rows()
        if self.cfg.source == "quantlrm":
            return self._load_fixed_order(source, rows)
        qrm_rng = random.Random(self.cfg.seed)    # QRM: random.seed(seed), then randint(0, 3) per row in order
        out = []
        for i, r in enumerate(rows):
            missing = [k for k in ("Question", *ANSWER_FIELDS) if k not in r]
            if missing:
                raise UserError(f"{source} record {i}: missing field(s) {', '.join(missing)}; a GPQA record needs "
                                f"Question, {', '.join(ANSWER_FIELDS)}")
            qid = _question_id(r)
            gold_pos = qrm_rng.randint(0, 3) if self.cfg.source == "qrm" else place_correct(qid, self.cfg.seed)
            order = list(ANSWER_FIELDS[1:])
            order.insert(gold_pos, ANSWER_FIELDS[0])   # incorrect answers keep their relative order
            choices = [str(r[k]) for k in order]
            domain = r.get("High-level domain")
            out.append(Example(
                id=qid, question={"question": str(r["Question"]), "choices": choices},
                gold=LETTERS[gold_pos],
                meta={"domain": str(domain) if _present(domain) else "unknown", "gold_letter": LETTERS[gold_pos],
                      "choice_order": order}))
        return out

    def _load_fixed_order(self, source: str, rows: list[dict]) -> list[Example]:
        """fingertap/GPQA-Diamond: options inside `question`, the gold letter in `answer`, order as stored."""
        out = []
        for i, r in enumerate(rows):
            if "question" not in r or "answer" not in r:
                raise UserError(f"{source} record {i}: a fingertap/GPQA-Diamond record needs 'question' and 'answer'; "
                                f"fields present: {', '.join(r)}")
            gold = str(r["answer"]).strip().strip("()")
            if gold not in LETTERS:
                raise UserError(f"{source} record {i}: answer={r['answer']!r} is not allowed; allowed: A, B, C, D")
            out.append(Example(id=str(r.get("id", i)), question={"question": str(r["question"])}, gold=gold,
                               meta={"domain": "unknown", "gold_letter": gold}))
        return out

    def example_for(self, answer, choices=None, ex_id: str = "") -> Example:
        """`choices`: the options (their number sets the letters, A.. ); default A-D."""
        letters = tuple("ABCDEFGHIJ"[: len(choices)]) if choices else LETTERS
        gold = str(answer).strip().strip("()")
        if gold not in letters:
            raise UserError(f"answer={answer!r} is not allowed for {ex_id or 'a row'}; allowed: {', '.join(letters)}")
        return Example(id=ex_id, question="", gold=gold, meta={"letters": list(letters)})

    def grade(self, ex: Example, answer_text: str) -> Score:
        """Judge a final-answer text (reasoning already stripped)."""
        return grade_choice(answer_text, ex.gold, ex.meta.get("letters", LETTERS))

    def grade_lighteval(self, ex: Example, text: str) -> Score:
        """QRM's gpqa_metric: IndicesExtractionConfig(prefix_for_extraction="NativeLetters") both sides."""
        return lighteval_letter(text, ex.gold, ex.meta.get("letters", LETTERS))
