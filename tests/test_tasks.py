"""The reasoning-benchmark task plugins: configs, loading (local files and the hub path), prompts, scoring.

Fixtures under tests/fixtures/tasks/ are hand-written in the real formats. Tests marked `real_data`
also run against the benchmark files in shared/data beside the repo, and skip when it is absent.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness import registry
from harness.tasks_base import TaskConfig
from harness.types import UserError

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "tasks"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("math500", "aime120", "gpqa_diamond", "folio", "temporal_sequences", "lm_eval")
needs_data = pytest.mark.skipif(not (DATA / "math500.jsonl").exists(), reason=f"no real data at {DATA}")


def make(name, **cfg):
    cls = registry.get("task", name)
    return cls(cls.Config(name=name, **cfg))


def done(text):
    """A finished reasoning-model completion whose final answer is `text`."""
    return f"<think>\nLet me work it out.\n</think>\n\n{text}"


# ------------------------------------------------------------------ configs

@pytest.mark.parametrize("name", TASKS)
def test_yaml_matches_config_schema_and_seed_interpolates(name):
    """The pipeline validates the YAML with OmegaConf.merge(structured(Config), node) after resolving
    `${seed}` against the root config; every task-specific field must be visible in the YAML."""
    cls = registry.get("task", name)
    node = OmegaConf.load(REPO / "conf" / "task" / f"{name}.yaml")
    root = OmegaConf.create({"seed": 7, "task": node})
    OmegaConf.resolve(root)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Config), root.task))
    assert isinstance(cfg, cls.Config) and cfg.name == name
    own = {f.name for f in dataclasses.fields(cls.Config)} - {f.name for f in dataclasses.fields(TaskConfig)}
    assert own <= set(node.keys()), f"fields missing from conf/task/{name}.yaml: {own - set(node.keys())}"
    if "seed" in own:
        assert cfg.seed == 7
    if name != "lm_eval":
        assert (cfg.sampling.n, cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.top_k,
                cfg.sampling.max_new_tokens) == (1, 0.6, 0.95, 0, 32768)


def test_registry_finds_every_task():
    assert set(TASKS) <= set(registry.available("task"))
    for name in TASKS:
        assert registry.get("task", name).name == name


def test_missing_local_file_is_a_user_error():
    with pytest.raises(UserError, match="task.data_files='nope.jsonl': no such file"):
        make("folio", data_files="nope.jsonl").examples()


# ------------------------------------------------------------------ math500

def test_math500_local_file_prompt_and_score():
    task = make("math500", data_files=str(FIX / "math500.jsonl"))
    exs = task.examples()
    assert [ex.id for ex in exs][:2] == ["test/prealgebra/9001.json", "test/prealgebra/9002.json"]
    assert [ex.meta["level"] for ex in exs] == [1, 2, 3, 2]            # "Level 3" normalised
    assert task.breakdown_keys == ("subject", "level")
    msgs = task.prompt(exs[0])
    assert msgs[0]["role"] == "user" and msgs[0]["content"].endswith(
        "Please reason step by step, and put your final answer within \\boxed{}.")
    assert make("math500", prompt_style="raw_think").prompt(exs[0]).endswith("<think>\n")
    assert task.score(exs[0], done("So it is $\\boxed{0.875}$.")).correct
    assert task.score(exs[3], done("$\\boxed{\\sqrt{50}}$")).correct
    assert not task.score(exs[0], done("\\boxed{7/9}")).correct
    s = task.score(exs[0], "<think>\\boxed{\\frac78} and still going", "length")
    # lighteval searches the whole completion (a boxed answer inside the unfinished trace counts); strict does not
    assert (s.truncated, s.unfinished, s.correct, s.correct_strict) == (True, True, True, False)
    assert make("math500", data_files=str(FIX / "math500.jsonl"), limit=2).examples() == exs[:2]


def test_math500_missing_field_names_it(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "answer": "2", "subject": "Algebra", "level": 1}) + "\n")
    with pytest.raises(UserError, match="record 0: missing field.*unique_id"):
        make("math500", data_files=str(bad)).examples()


def test_hub_path_passes_dataset_split_and_revision(monkeypatch):
    import harness.tasks_base as mod
    calls = []
    rows = [json.loads(line) for line in (FIX / "math500.jsonl").open()]
    monkeypatch.setattr(mod, "load_hub_records", lambda *a: calls.append(a) or rows)
    assert len(make("math500", revision="abc123").examples()) == 4
    assert calls == [("HuggingFaceH4/MATH-500", None, "test", "abc123", "math500")]


# ------------------------------------------------------------------ aime120

def test_aime_local_file_subsets_and_breakdown():
    exs = make("aime120", data_files=str(FIX / "aime.jsonl")).examples()
    assert [(ex.id, ex.meta["year"], ex.gold) for ex in exs] == [
        ("2023-I-1", 2023, "111"), ("2024-I-2", 2024, "25"), ("2024-II-3", 2024, "0"), ("2025-I-4", 2025, "999")]
    assert [ex.id for ex in make("aime120", data_files=str(FIX / "aime.jsonl"), subset="aime24").examples()] == [
        "2024-I-2", "2024-II-3"]
    assert [ex.id for ex in make("aime120", data_files=str(FIX / "aime.jsonl"), subset="aime25").examples()] == [
        "2025-I-4"]
    task = make("aime120")
    assert task.score(exs[1], done("The answer is $\\boxed{025}$.")).correct
    assert not task.score(exs[1], done("\\boxed{26}")).correct


def test_aime_hublike_records_year_from_url_and_leading_zeros():
    exs = make("aime120", data_files=str(FIX / "aime_hublike.jsonl")).examples()
    assert [(ex.id, ex.gold, ex.meta["year"]) for ex in exs] == [("60", "25", 2024), ("61", "7", 2022)]


def test_aime_bad_subset_and_bad_answer(tmp_path):
    with pytest.raises(UserError, match=r"task.subset='aime26' is not allowed; allowed: all, .*aime25"):
        make("aime120", subset="aime26")
    bad = tmp_path / "a.jsonl"
    bad.write_text(json.dumps({"id": "2024-I-1", "problem": "p", "answer": "1000"}) + "\n")
    with pytest.raises(UserError, match="answer='1000' is not an AIME answer; allowed: an integer 0..999"):
        make("aime120", data_files=str(bad)).examples()
    bad.write_text(json.dumps({"id": 3, "problem": "p", "answer": "10"}) + "\n")
    assert len(make("aime120", data_files=str(bad)).examples()) == 1     # no year is fine for subset=all
    with pytest.raises(UserError, match="cannot tell its year"):
        make("aime120", data_files=str(bad), subset="aime24").examples()


def test_aime_hub_loads_only_what_the_subset_needs(monkeypatch):
    import tasks.aime120 as mod
    calls = []
    hub = {"xiaoyuanliu/AIME90": [{"id": 0, "problem": "p0", "answer": "5",
                                   "url": "https://x/2023_AIME_I_Problems/Problem_1"}],
           "yentinglin/aime_2025": [{"id": 0, "problem": "q0", "answer": "070"}]}
    monkeypatch.setattr(mod, "load_hub_records",
                        lambda path, name, split, rev, task: calls.append((path, rev)) or hub[path])
    exs = make("aime120", revision="r90", revision_aime25="r25").examples()
    assert [(ex.id, ex.gold, ex.meta["year"]) for ex in exs] == [("aime90/0", "5", 2023), ("aime25/0", "70", 2025)]
    assert calls == [("xiaoyuanliu/AIME90", "r90"), ("yentinglin/aime_2025", "r25")]
    calls.clear()
    assert [ex.id for ex in make("aime120", subset="aime25").examples()] == ["aime25/0"]
    assert calls == [("yentinglin/aime_2025", None)]


# ------------------------------------------------------------------ gpqa_diamond

def gpqa(seed, **kw):
    return make("gpqa_diamond", data_files=str(FIX / "gpqa_diamond.csv"), seed=seed, **kw)


def test_gpqa_placement_is_recorded_reproducible_and_seed_dependent():
    exs = gpqa(0).examples()
    assert [ex.id for ex in exs] == ["recTEST0001", "recTEST0002", "recTEST0003"]
    correct = ["Total kinetic energy", "sp3", "Mitochondrion"]
    for ex, right in zip(exs, correct):
        pos = "ABCD".index(ex.gold)
        assert ex.meta["gold_letter"] == ex.gold
        assert ex.question["choices"][pos] == right
        assert ex.meta["choice_order"][pos] == "Correct Answer"
        assert sorted(ex.meta["choice_order"]) == sorted(
            ["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"])
    assert [ex.gold for ex in gpqa(0).examples()] == [ex.gold for ex in exs]
    golds_by_seed = {tuple(ex.gold for ex in gpqa(s).examples()) for s in range(12)}
    assert len(golds_by_seed) > 1
    # Placement depends on (question id, seed) only, not on the other questions in the file.
    from tasks.gpqa_diamond import place_correct
    assert all("ABCD"[place_correct(ex.id, 5)] == ex.gold for ex in gpqa(5).examples())


def test_gpqa_placement_does_not_depend_on_python_hash_seed():
    code = "from tasks.gpqa_diamond import place_correct; print([place_correct(f'rec{i}', 3) for i in range(30)])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    from tasks.gpqa_diamond import place_correct
    assert out == str([place_correct(f"rec{i}", 3) for i in range(30)])


def test_gpqa_prompt_score_and_domain():
    task = gpqa(1)
    exs = task.examples()
    text = task.prompt_text(exs[0])
    assert "'Answer: $LETTER' (without quotes) where LETTER is one of ABCD" in text
    assert re.search(r"\nA\) .+\nB\) .+\nC\) .+\nD\) .+$", text)
    assert f"{exs[0].gold}) Total kinetic energy" in text
    assert task.score(exs[0], done(f"Energy is conserved.\nAnswer: {exs[0].gold}")).correct
    wrong = "ABCD"[("ABCD".index(exs[0].gold) + 1) % 4]
    assert not task.score(exs[0], done(f"Answer: {wrong}")).correct
    assert [ex.meta["domain"] for ex in exs] == ["Physics", "Chemistry", "unknown"]


def test_gpqa_gated_hub_error_says_what_to_do(monkeypatch):
    import datasets

    def refuse(*a, **k):
        raise ConnectionError("Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub.")
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(UserError) as e:
        make("gpqa_diamond").examples()
    msg = str(e.value)
    assert "Idavidrein/gpqa" in msg and "gpqa_diamond" in msg and "accept its terms" in msg
    assert "hf auth login" in msg and "task.data_files=" in msg


# ------------------------------------------------------------------ folio

def test_folio_both_layouts():
    v0 = make("folio", data_files=str(FIX / "folio_v0.jsonl")).examples()
    v2 = make("folio", data_files=str(FIX / "folio_v2.jsonl")).examples()
    assert [ex.gold for ex in v0] == ["True", "Uncertain", "False"]
    assert [(ex.id, ex.gold) for ex in v2] == [("21", "False"), ("22", "Uncertain")]    # "Unknown" -> Uncertain
    same = ("premises", "conclusion")
    assert {k: v0[2].question[k] for k in same} == {k: v2[0].question[k] for k in same} == {
        "premises": ["No square is a circle.", "Shape S is a square."], "conclusion": "Shape S is a circle."}
    assert (v0[2].meta["folio_version"], v2[0].meta["folio_version"]) == ("v0.0", "v2")


def test_folio_prompt_and_score():
    task = make("folio", data_files=str(FIX / "folio_v0.jsonl"))
    ex = task.examples()[1]
    text = task.prompt_text(ex)
    assert "1. All owls in the barn hunt at night.\n2. Hoot is an owl in the barn." in text
    assert "Conclusion: Hoot sleeps during the day." in text and "'Answer: Uncertain'" in text
    assert task.score(ex, done("Nothing says when Hoot sleeps.\nAnswer: Uncertain")).correct
    assert not task.score(ex, done("Answer: True")).correct


def test_folio_bad_label(tmp_path):
    bad = tmp_path / "f.jsonl"
    bad.write_text(json.dumps({"premises": ["a"], "conclusion": "b", "label": "Maybe"}) + "\n")
    with pytest.raises(UserError, match="label='Maybe' is not allowed; allowed: True, False, Uncertain"):
        make("folio", data_files=str(bad)).examples()


# ------------------------------------------------------------------ temporal_sequences

def test_temporal_loads_bbh_json_and_scores_letters():
    task = make("temporal_sequences", data_files=str(FIX / "bbh_temporal_sequences.json"))
    exs = task.examples()
    assert [(ex.id, ex.gold, ex.meta["options"]) for ex in exs] == [
        ("temporal_sequences/0", "(B)", list("ABCD")), ("temporal_sequences/1", "(D)", list("ABCD"))]
    s = task.score(exs[0], done("Nora was free from 9am to 10am. So the answer is (B)."))
    assert (s.correct, s.parsed) == (True, "(B)")
    # A 3-shot completion that runs on into an invented next question is cut before scoring.
    runaway = done("So the answer is (B).\n\nQ: Today, Ann went to the zoo.\nOptions:\n(A) 1pm\n(C) 2pm")
    assert task.score(exs[0], runaway).parsed == "(B)"


def test_temporal_prompts_zero_and_few_shot():
    ex = make("temporal_sequences", data_files=str(FIX / "bbh_temporal_sequences.json")).examples()[0]
    zero = make("temporal_sequences").prompt_text(ex)
    assert zero.startswith(ex.question) and "So the answer is (X)." in zero and "Q:" not in zero
    three = make("temporal_sequences", fewshot=3).prompt_text(ex)
    assert three.count("\nQ: ") == 4 and three.count("So the answer is (") == 3
    assert three.endswith(f"Q: {ex.question}\nA: Let's think step by step.")
    with pytest.raises(UserError, match="task.fewshot=4 is not allowed; allowed: 0..3"):
        make("temporal_sequences", fewshot=4)


def _hour(t: str) -> int:
    h, ampm = int(t[:-2]), t[-2:]
    return h % 12 + (12 if ampm == "pm" else 0)


def test_fewshot_exemplars_are_correct():
    """Each exemplar's stated answer is the one option inside the person's only free interval."""
    from tasks.temporal_sequences import EXEMPLARS
    for question, reasoning in EXEMPLARS:
        wake = _hour(re.search(r"woke up at (\w+)\.", question).group(1))
        close = _hour(re.search(r"closed after (\w+)\.", question).group(1))
        busy = [(_hour(a), _hour(b)) for a, b in re.findall(r" from (\w+) to (\w+)\.", question)]
        free = [h for h in range(wake, close) if not any(a <= h < b for a, b in busy)]
        options = {l: (_hour(a), _hour(b)) for l, a, b in re.findall(r"\(([A-D])\) (\w+) to (\w+)", question)}
        right = [l for l, (a, b) in options.items() if all(h in free for h in range(a, b))]
        assert len(right) == 1
        assert reasoning.endswith(f"So the answer is ({right[0]}).")


# ------------------------------------------------------------------ real data (shared/data)

@needs_data
def test_real_files_load_with_documented_counts():
    from tasks.validate import check_loading
    lines = check_loading(DATA)
    assert len(lines) == 4 and not [line for line in lines if line.startswith("FAIL")], lines


@needs_data
def test_real_bbh_outputs_agree_fully():
    from tasks.validate import regrade_bbh
    agree, total, lines = regrade_bbh(DATA)
    assert (agree, total, lines) == (250, 250, [])


@needs_data
def test_real_math_outputs_agree_and_every_disagreement_is_explained():
    from tasks.validate import regrade_math
    agree, total, lines = regrade_math(DATA)
    assert total == 284 and agree / total >= 0.98
    assert not [line for line in lines if "NOT EXAMINED" in line], lines


@needs_data
def test_real_gold_round_trip():
    from tasks.validate import gold_round_trip
    lines = gold_round_trip(DATA)
    assert all(line.startswith("ok") for line in lines), lines


# ------------------------------------------------------------------ through the pipeline's config

@pytest.mark.parametrize("name", ["gpqa_diamond", "lm_eval"])
def test_run_seed_reaches_the_task_config(name):
    """Contract with the pipeline: `seed: ${seed}` in the task YAML carries the top-level run seed
    through Hydra composition and harness.config.validate into the task's Config."""
    from hydra import compose, initialize_config_dir
    from harness.config import validate
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"task={name}", "seed=5"])
    spec = validate(cfg)
    assert spec.task_cls is registry.get("task", name) and spec.task_cfg.seed == 5
    if name == "gpqa_diamond":
        from tasks.gpqa_diamond import place_correct
        spec.task_cfg.data_files = str(FIX / "gpqa_diamond.csv")
        exs = spec.task_cls(spec.task_cfg).examples()
        assert [ex.gold for ex in exs] == ["ABCD"[place_correct(ex.id, 5)] for ex in exs]
