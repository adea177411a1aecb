"""conf/references.csv: a faithful transcription of the published tables (values written here, read off the papers'
tables via the shared published-results CSV), and the matching rules that attach them to runs."""
from pathlib import Path

import pandas as pd
import pytest

from harness import references

CONF = Path(references.CONF)
METHODS = {p.stem for p in (CONF / "method").glob("*.yaml")}
TASKS = {p.stem for p in (CONF / "task").glob("*.yaml")}
QRM_1_5B = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"

# (paper, table, model, method, bits, group, calib, samples, seq_len, task, subset, metric, mean, std, n_seeds)
SAMPLE = [
    ("qrm", "Table 1", QRM_1_5B, "fp", 16, None, None, None, None, "aime120", None, "acc", 23.3, 2.2, 3),
    ("qrm", "Table 1", QRM_1_5B, "awq", 4, 128, "pileval", 128, 512, "aime120", None, "acc", 21.1, 2.1, 3),
    ("qrm", "Table 1", QRM_1_5B, "gptq", 3, 128, "reasoning", 128, 2048, "math500", None, "acc", 75.3, 0.4, 3),
    ("qrm", "Table 1", QRM_1_5B, "awq", 3, 128, "pileval", 128, 512, "gpqa_diamond", None, "acc", 31.8, 6.1, 3),
    ("qrm", "Table 1", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "awq", 4, 128, "pileval", 128, 512, "aime120",
     None, "acc", 42.2, 1.0, 3),
    ("qrm", "Table 1", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "gptq", 4, 128, "reasoning", 128, 2048,
     "aime120", None, "acc", 52.5, 2.2, 3),
    ("qrm", "Table 2", QRM_1_5B, "gptq", 3, 128, "wikitext2", None, None, "math500", None, "acc", 49.4, None, 1),
    ("qrm", "Table 2", QRM_1_5B, "gptq", 3, 128, "reasoning", None, None, "math500", None, "acc", 71.6, None, 1),
    ("qrm", "Table 2", QRM_1_5B, "awq", 3, 128, "reasoning", None, None, "aime120", None, "acc", 5.8, None, 1),
    ("qrm", "Table 2", QRM_1_5B, "fp", 16, None, None, None, None, "gpqa_diamond", None, "acc", 36.9, None, 1),
    ("sliderquant", "Table 5", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "sliderquant", 2, None, "wikitext2", 128,
     2048, "aime120", "aime24", "pass@1", 10.0, None, 1),
    ("sliderquant", "Table 5", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "sliderquant", 4, None, "wikitext2", 128,
     2048, "math500", None, "pass@1", 94.6, None, 1),
    ("sliderquant", "Table 5", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "sliderquant", 2, None, "wikitext2", 128,
     2048, "math500", None, "pass@1", 58.6, None, 1),
    ("sliderquant", "Table 5", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "fp", 16, None, "wikitext2", 128, 2048,
     "aime120", "aime24", "pass@1", 76.67, None, 1),
    # Table 1 perplexity (NOTES.md: Llama2-7B WikiText2/C4 FP16 5.47/6.97, W4A16 GPTQ 5.83/7.37, SliderQuant 5.61/7.19)
    ("sliderquant", "Table 1", "meta-llama/Llama-2-7b-hf", "fp", 16, -1, "wikitext2", 128, 2048, "ppl", None,
     "perplexity", 5.47, None, 1),
    ("sliderquant", "Table 1", "meta-llama/Llama-2-7b-hf", "gptq", 4, -1, "wikitext2", 128, 2048, "ppl", "c4",
     "perplexity", 7.37, None, 1),
    ("sliderquant", "Table 1", "meta-llama/Llama-2-7b-hf", "sliderquant", 4, -1, "wikitext2", 128, 2048, "ppl", None,
     "perplexity", 5.61, None, 1),
]
FIELDS = ["paper", "table", "model", "method", "bits", "group_size", "calib", "calib_samples", "calib_seq_len", "task",
          "subset", "metric", "mean", "std", "n_seeds"]


@pytest.fixture(scope="module")
def refs():
    return references.load()


def _none(v):
    return None if references._missing(v) else v


@pytest.mark.parametrize("row", SAMPLE, ids=lambda r: f"{r[0]}-{r[1]}-{r[3]}{r[4]}-{r[9]}")
def test_sampled_rows_are_transcribed(refs, row):
    want = dict(zip(FIELDS, row))
    keys = ["paper", "table", "model", "method", "bits", "task", "subset", "calib", "metric"]
    sel = refs[refs["act_bits"] == 16]                 # every sampled row is weight-only (W4A4 rows sit beside W4A16)
    for k in keys:
        sel = sel[sel[k].isna()] if want[k] is None else sel[sel[k] == want[k]]
    assert len(sel) == 1, want
    got = sel.iloc[0]
    for k in FIELDS:
        v = _none(got[k])
        assert (v == pytest.approx(want[k]) if isinstance(want[k], float) else v == want[k]), (k, v, want[k])
    assert got["source"].endswith(want["table"]) and "arXiv" in got["source"]


def test_every_row_is_runnable_and_sourced(refs):
    # QRM T1/3/4/5: 120, T2: 15; SliderQuant T5: 12 and T1: 84 (OmniQuant, GSM8K and LiveCodeBench are not ours)
    assert len(refs) == 231
    assert set(refs["method"]) <= METHODS and set(refs["task"]) <= TASKS
    assert set(refs["task"]) == {"aime120", "math500", "gpqa_diamond", "ppl"}
    assert set(refs["paper"]) == {"qrm", "sliderquant"}
    assert ((refs["method"] == "fp") == (refs["bits"] == 16)).all()
    acc = refs[refs["metric"] != "perplexity"]
    assert acc["mean"].between(0, 100).all() and refs["n_seeds"].isin([1, 3]).all() and (refs["mean"] > 0).any()
    assert len(refs[refs["metric"] == "perplexity"]) == 84 and (refs[refs["metric"] == "perplexity"]["mean"] > 1).all()
    assert (refs[refs["n_seeds"] == 3]["std"].notna()).all() and (refs[refs["n_seeds"] == 1]["std"].isna()).all()
    assert refs["source"].str.contains("arXiv").all()
    # Each (paper, table, model, method, bits, calib, task, subset) is one published cell.
    key = ["paper", "table", "model", "method", "bits", "act_bits", "calib", "task", "subset"]
    assert not refs[key].astype(str).duplicated().any()
    assert len(refs[(refs["paper"] == "qrm") & (refs["table"] == "Table 1")
                    & (refs["model"] == QRM_1_5B) & (refs["method"] != "fp")]) == 12


def test_build_from_a_published_csv(tmp_path):
    """The generator keeps runnable rows only and normalises calibration, group and AIME-2024."""
    src = tmp_path / "pub.csv"
    pd.DataFrame([
        {"paper": "SliderQuant (arXiv 2603.25284, ICLR 2026)", "table": "Table 5", "model": "m/A", "method": "sliderquant",
         "bits": 4, "act_bits": 16, "group_size": "unknown", "calib": "wikitext2 128x2048", "task": "aime24",
         "metric": "pass@1", "mean": 70.0, "std": "", "n_seeds": 1, "seeds": "", "note": "n"},
        {"paper": "SliderQuant (arXiv 2603.25284, ICLR 2026)", "table": "Table 5", "model": "m/A", "method": "omniquant",
         "bits": 4, "act_bits": 16, "group_size": "unknown", "calib": "wikitext2 128x2048", "task": "aime24",
         "metric": "pass@1", "mean": 50.0, "std": "", "n_seeds": 1, "seeds": "", "note": ""},
        {"paper": "Quantization Hurts Reasoning? (arXiv 2504.04823v2, COLM 2025)", "table": "Table 1", "model": "m/B",
         "method": "gptq", "bits": 3, "act_bits": 16, "group_size": "128",
         "calib": "self-generated NuminaMath-1.5 reasoning traces 128x2048", "task": "gsm8k", "metric": "acc",
         "mean": 1.0, "std": 0.1, "n_seeds": 3, "seeds": "42,43,44", "note": ""},
    ]).to_csv(src, index=False)
    out = references.from_published(src, METHODS, TASKS)
    assert len(out) == 1
    r = out.iloc[0]
    assert (r["task"], r["subset"], r["calib"], r["calib_samples"], r["calib_seq_len"]) == \
        ("aime120", "aime24", "wikitext2", 128, 2048)
    assert references._missing(r["group_size"]) and r["paper"] == "sliderquant" and r["calib_text"] == "wikitext2 128x2048"


def test_matching_rules(refs):
    pile = {"name": "pileval", "n_samples": 128, "seq_len": 512}
    run = references.run_descriptor(model="/data/DeepSeek-R1-Distill-Qwen-1.5B/", method="awq", bits=4, group_size=128,
                                    calib=pile, task="aime120", subset="all")
    [ref] = [r for _, r in references.find(refs, run).iterrows()]
    assert (ref["table"], ref["mean"]) == ("Table 1", 21.1)
    assert references.find(refs, {**run, "calib": {**pile, "seq_len": 2048}}).empty        # other calibration
    assert references.find(refs, {**run, "group_size": 64}).empty
    assert references.find(refs, {**run, "act_bits": 4}).empty
    assert references.find(refs, {**run, "subset": "aime24"}).empty
    gptq3 = references.run_descriptor(model=QRM_1_5B, method="gptq", bits=3, group_size=128, task="math500",
                                      calib={"name": "reasoning", "n_samples": 128, "seq_len": 2048})
    assert sorted(references.find(refs, gptq3)["table"]) == ["Table 1", "Table 2"]        # Table 2 prints no size
    assert list(references.find(refs, gptq3, table="Table 2")["mean"]) == [71.6]
    # SliderQuant's group size is not printed: any group matches; its fp rows match whatever we calibrate.
    sq = references.run_descriptor(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", method="fp", bits=None,
                                   task="aime120", subset="aime24")
    assert list(references.find(refs, sq, paper="sliderquant")["mean"]) == [76.67]
    assert references.find(refs, sq, metric="acc_strict").empty
    # Perplexity: task=ppl on C4 is the subset "c4"; RTN calibrates nothing, so the row's calibration is no key.
    rtn = references.run_descriptor(model="meta-llama/Llama-2-7b-hf", method="rtn", bits=4, group_size=-1, task="ppl",
                                    subset="c4")
    assert len(references.find(refs, rtn, metric="ppl")) == 1
    assert references.find(refs, {**rtn, "subset": "wikitext2"}, metric="ppl")["subset"].isna().all()
