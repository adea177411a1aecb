"""Paper-exact prompt templates (`task.template`), data sources (`task.source`) and the result's task info.

Every expected string below is written out by hand from the paper's code, not built by the code under test:
- qrm: ruikangliu/Quantized-Reasoning-Models lighteval_custom/tasks/reasoning.py (prompt_fn, aime25_prompt_fn,
  gpqa_prompt_fn);
- quantlrm: psunlpgroup/QuantLRM inference_vllm.py (the four `total_input.append(...)` lines);
- bbh: BBH's cot-prompts/temporal_sequences.txt as lm-eval ships it.
"""
import json
from pathlib import Path

import pytest

from harness import registry
from harness.types import Example, UserError

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "tasks"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

MATH = Example(id="m1", question="What is $1+1$?", gold="2")


def make(name, **cfg):
    cls = registry.get("task", name)
    return cls(cls.Config(name=name, **cfg))


@pytest.mark.parametrize("name", ["math500", "aime120"])
def test_math_templates(name):
    qrm = make(name).prompt(MATH)
    assert qrm == [{"role": "user", "content": "What is $1+1$?\n\nPlease reason step by step, and put your final "
                                                "answer within \\boxed{}."}]
    assert make(name, template="rqbench").prompt(MATH)[0]["content"] == (
        "What is $1+1$?\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert make(name, prompt_style="raw_think").prompt(MATH) == (
        "What is $1+1$?\n\nPlease reason step by step, and put your final answer within \\boxed{}.\n<think>\n")


def test_aime_quantlrm_template_is_raw():
    assert make("aime120", template="quantlrm").prompt(MATH) == "What is $1+1$?\n<think>\n"
    with pytest.raises(UserError, match="task.template='quantlrm' is a raw prompt"):
        make("aime120", template="quantlrm", prompt_style="chat")
    with pytest.raises(UserError, match="task.template='quantlrm' is not allowed for task math500; allowed: qrm, rqbench"):
        make("math500", template="quantlrm")


GPQA = Example(id="g1", question={"question": "Which is heavier? ", "choices": [" lead", "gold", "tin", "air "]},
               gold="A")


def test_gpqa_templates():
    assert make("gpqa_diamond").prompt(GPQA)[0]["content"] == (
        "Answer the following multiple choice question. The last line of your response should be of the following "
        "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before "
        "answering.\n\nWhich is heavier? \n\nA)  lead\nB) gold\nC) tin\nD) air ")
    assert make("gpqa_diamond", template="rqbench").prompt(GPQA)[0]["content"].endswith(
        "answering.\n\nWhich is heavier?\n\nA) lead\nB) gold\nC) tin\nD) air")
    q = Example(id="0", question={"question": "What? (A) x (B) y"}, gold="B")
    assert make("gpqa_diamond", template="quantlrm", source="quantlrm").prompt(q) == (
        "Answer the question by giving the index (the letter) of the actual correct answer.\nWhat? (A) x (B) y\n<think>\n")
    with pytest.raises(UserError, match="does not fit task.source"):
        make("gpqa_diamond", template="quantlrm")


def test_gpqa_qrm_placement_is_random_seed_then_randint_per_row():
    # random.seed(42); [random.randint(0, 3) for _ in range(3)] == [0, 0, 2]; seed 43: [0, 2, 1]
    for seed, want in ((42, "AAC"), (43, "ACB")):
        exs = make("gpqa_diamond", data_files=str(FIX / "gpqa_diamond.csv"), source="qrm", seed=seed).examples()
        assert "".join(ex.gold for ex in exs) == want
        assert all(ex.question["choices"]["ABCD".index(ex.gold)] == c
                   for ex, c in zip(exs, ["Total kinetic energy", "sp3", "Mitochondrion"]))


def test_gpqa_fingertap_layout(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "Q1? (A) a (B) b (C) c (D) d", "answer": "C"}) + "\n")
    exs = make("gpqa_diamond", data_files=str(f), template="quantlrm", source="quantlrm").examples()
    assert [(ex.id, ex.gold) for ex in exs] == [("0", "C")]
    f.write_text(json.dumps({"question": "Q1?", "answer": "E"}) + "\n")
    with pytest.raises(UserError, match="answer='E' is not allowed"):
        make("gpqa_diamond", data_files=str(f), template="quantlrm", source="quantlrm").examples()


def test_folio_quantlrm_template_has_no_newline_before_think():
    task = make("folio", data_files=str(FIX / "folio_v2.jsonl"), template="quantlrm")
    ex = task.examples()[0]
    assert task.prompt(ex) == (
        "Use logical deductions to determine whether the provided conclusion is true, false, or uncertain based on "
        "premise. Consider all relevant information to reach a logical conclusion.\n\n*******\nPremise: No square is "
        "a circle.\nShape S is a square.\n*******\n\n*******\nConclusion: Shape S is a circle.\n*******<think>\n")
    assert task.result_info()["folio_version"] == "v2"
    v0 = make("folio", data_files=str(FIX / "folio_v0.jsonl"), template="quantlrm")
    v0.examples()
    assert v0.result_info()["folio_version"] == "v0.0"


TEMPORAL_INPUT = "Today, Ann went to the zoo. Between what times could they have gone?\nOptions:\n(A) 1pm to 2pm"


def test_temporal_quantlrm_and_bbh_templates():
    ex = Example(id="t0", question=TEMPORAL_INPUT, gold="(A)", meta={"options": ["A"]})
    assert make("temporal_sequences", template="quantlrm").prompt(ex) == (
        "Use the timeline provided and answer step by step. Finally give the index (the letter) of the actual correct "
        f"answer.\n{TEMPORAL_INPUT}\n<think>\n")
    bbh = make("temporal_sequences", template="bbh").prompt_text(ex)
    assert bbh.startswith("Task description: Answer questions about which times certain events could have occurred."
                          "\n\nQ: Today, Emily went to the museum. Between what times could they have gone?\nWe know that:")
    assert bbh.count("\nA: Let's think step by step.\n") == 3
    assert [bbh.count(f"So the answer is ({x}).") for x in "ABCD"] == [2, 0, 0, 1]
    assert bbh.endswith(f"So the answer is (D).\n\nQ: {TEMPORAL_INPUT}\nA: Let's think step by step.")
    with pytest.raises(UserError, match="task.fewshot=2 applies to task.template=rqbench only"):
        make("temporal_sequences", template="bbh", fewshot=2)


@pytest.mark.skipif(not (DATA / "bbh_temporal_sequences_cot_prompt.txt").exists(), reason=f"no real data at {DATA}")
def test_bbh_prompt_is_byte_identical_to_the_official_file():
    official = (DATA / "bbh_temporal_sequences_cot_prompt.txt").read_text(encoding="utf-8").split("-----\n", 1)[1]
    from tasks.temporal_sequences import bbh_cot_prompt
    assert bbh_cot_prompt() == official.rstrip("\n")


def test_unknown_source_and_lighteval_version_name_the_key():
    with pytest.raises(UserError, match="task.source='nope' is not allowed for task aime120; allowed: qrm, quantlrm, "
                                        "aime2024"):
        make("aime120", source="nope")
    with pytest.raises(UserError, match="task.lighteval_version='0.9' is not allowed; allowed: 0.8, 0.11"):
        make("math500", lighteval_version="0.9")


def test_aime2024_source_reads_only_the_2024_problems(monkeypatch):
    import tasks.aime120 as mod
    hub = {"xiaoyuanliu/AIME90": [{"id": 0, "problem": "p0", "answer": "5", "url": "https://x/2023_AIME_I_Problems/Problem_1"},
                                  {"id": 1, "problem": "p1", "answer": "6", "url": "https://x/2024_AIME_I_Problems/Problem_1"}]}
    calls = []
    monkeypatch.setattr(mod, "load_hub_records", lambda path, *a: calls.append(path) or hub[path])
    t = make("aime120", source="aime2024")
    assert [ex.id for ex in t.examples()] == ["aime90/1"]
    assert t.cfg.subset == "aime24"           # the run is labelled AIME-2024, not AIME-120
    assert calls == ["xiaoyuanliu/AIME90"]
    calls.clear()
    monkeypatch.setattr(mod, "load_hub_records", lambda path, *a: calls.append(path) or [
        {"problem": "p", "answer": "7"}])
    assert [ex.gold for ex in make("aime120", source="quantlrm").examples()] == ["7"]
    assert calls == ["ChuGyouk/AIME-22-25"]


def test_sampling_max_model_len_is_validated_and_recorded():
    from hydra import compose, initialize_config_dir
    from harness.config import validate
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        ok = compose("config", overrides=["sampling.max_model_len=4096"])
        bad = compose("config", overrides=["sampling.max_model_len=1"])
    assert validate(ok).sampling.max_model_len == 4096
    with pytest.raises(UserError, match="sampling.max_model_len=1 is not allowed"):
        validate(bad)
