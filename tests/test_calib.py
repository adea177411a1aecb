"""Calibration sources: deterministic ids, local files, reasoning-trace cache, clear offline errors."""
import json

import pytest
import torch

from harness.calib import CalibConfig, as_calib_config, calibration_ids
from harness.toy.tokenizer import build_tokenizer
from harness.types import UserError


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_toy_is_the_task_training_distribution_and_deterministic(tok):
    cfg = {"name": "toy", "n_samples": 16, "seq_len": 128, "seed": 0}
    a, b = calibration_ids(cfg, tok), calibration_ids(cfg, tok)
    assert a.shape == (16, 128) and a.dtype == torch.long and torch.equal(a, b)
    assert not torch.equal(a, calibration_ids({**cfg, "seed": 1}, tok))
    text = tok.decode(a.flatten())
    assert "Compute: " in text and "<think>" in text and "\\boxed{" in text
    from harness.toy import arith
    held_out = {p.expression for p in arith.problems("test", 300, 0)}
    assert not any(f"Compute: {e}<" in text for e in held_out)


def test_local_jsonl(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"body": f"document number {i} " * 5}) + "\n" for i in range(40)))
    ids = calibration_ids({"name": "local", "path": str(path), "text_key": "body", "n_samples": 4, "seq_len": 64}, tok)
    assert ids.shape == (4, 64) and "document number" in tok.decode(ids[0])
    with pytest.raises(UserError, match="'text' field"):
        calibration_ids({"name": "local", "path": str(path), "n_samples": 4, "seq_len": 64}, tok)
    with pytest.raises(UserError, match="needs calib.path"):
        calibration_ids({"name": "local"}, tok)
    with pytest.raises(UserError, match="tokens of text"):
        calibration_ids({"name": "local", "path": str(path), "text_key": "body", "n_samples": 400, "seq_len": 512}, tok)


def test_reasoning_traces_cached_and_reused(tmp_path, tok):
    calls = []

    def generate(prompts, max_new_tokens):
        calls.append((list(prompts), max_new_tokens))
        return [f"<think>\nthinking about {p[-12:]!r}\n</think>\n\\boxed{{{i}}}" for i, p in enumerate(prompts)]

    cfg = {"name": "reasoning", "prompts": "toy", "n_samples": 6, "seq_len": 96, "max_new_tokens": 50}
    first = calibration_ids(cfg, tok, cache_dir=tmp_path, generate=generate, model_key="toy@abc")
    assert first.shape == (6, 96) and calls and all(m == 50 for _, m in calls)
    text = tok.decode(first.flatten())
    assert "<|im_start|>assistant\n<think>\nthinking about" in text        # prompt + the model's own trace
    n_calls = len(calls)
    again = calibration_ids(cfg, tok, cache_dir=tmp_path, generate=None, model_key="toy@abc")
    assert torch.equal(first, again) and len(calls) == n_calls              # rerun: all from the cache
    calibration_ids(cfg, tok, cache_dir=tmp_path, generate=generate, model_key="other-model")
    assert len(calls) > n_calls                                             # another model: new traces
    files = list((tmp_path / "calib" / "traces").glob("*.jsonl"))
    assert len(files) == 2
    with pytest.raises(UserError, match="no generator"):
        calibration_ids({**cfg, "max_new_tokens": 51}, tok, cache_dir=tmp_path, generate=None, model_key="toy@abc")


def test_reasoning_from_local_prompts_and_torn_cache_line(tmp_path, tok):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"What is {i} + {i}?"}) + "\n" for i in range(30)))
    cfg = {"name": "reasoning", "prompts": "local", "path": str(prompts), "prompt_key": "question",
           "n_samples": 2, "seq_len": 64, "n_prompts": 10}
    ids = calibration_ids(cfg, tok, cache_dir=tmp_path, generate=lambda ps: ["ok " * 5] * len(ps))   # plain callable
    assert ids.shape == (2, 64)
    trace_file = next((tmp_path / "calib" / "traces").glob("*.jsonl"))
    assert len(trace_file.read_text().splitlines()) == 10
    with trace_file.open("a") as f:
        f.write('{"prompt": "torn')                           # a job killed mid-write
    again = calibration_ids(cfg, tok, cache_dir=tmp_path, generate=None)
    assert torch.equal(ids, again)


def test_hub_source_offline_is_a_clear_error(tok, monkeypatch):
    import datasets
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name, dataset in [("pileval", "mit-han-lab/pile-val-backup"), ("wikitext2", "Salesforce/wikitext")]:
        with pytest.raises(UserError) as e:
            calibration_ids({"name": name, "n_samples": 2, "seq_len": 16}, tok)
        assert dataset in str(e.value) and "calib=local calib.path=" in str(e.value)
    with pytest.raises(UserError, match="AI-MO/NuminaMath-1.5"):
        calibration_ids({"name": "reasoning", "n_samples": 2, "seq_len": 16}, tok, generate=lambda p, **k: p)


def test_hub_sources_with_a_stand_in_dataset(tok, monkeypatch):
    import datasets
    seen = []

    def fake_load(name, subset=None, split=None, data_files=None):
        seen.append((name, subset, split, data_files))
        return datasets.Dataset.from_dict({"text": [f"line {i} of the corpus, some words here." * 4 for i in range(50)]})
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    w = calibration_ids({"name": "wikitext2", "n_samples": 5, "seq_len": 32, "seed": 3}, tok)
    assert w.shape == (5, 32) and torch.equal(w, calibration_ids({"name": "wikitext2", "n_samples": 5, "seq_len": 32,
                                                                   "seed": 3}, tok))
    c = calibration_ids({"name": "c4", "n_samples": 3, "seq_len": 32}, tok)
    p = calibration_ids({"name": "pileval", "n_samples": 3, "seq_len": 32}, tok)
    assert c.shape == p.shape == (3, 32)
    assert seen[0] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", None)
    assert ("allenai/c4", None, "train", "en/c4-train.00000-of-01024.json.gz") in seen
    assert ("mit-han-lab/pile-val-backup", None, "validation", None) in seen


def test_reasoning_from_the_hub_reruns_offline_from_the_cache(tmp_path, tok, monkeypatch):
    """Once its traces are made, a calib=reasoning run needs neither the hub prompt dataset nor the model."""
    import datasets
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(
        {"problem": [f"What is {i} times {i}?" for i in range(40)]}))
    cfg = {"name": "reasoning", "n_samples": 3, "seq_len": 48, "n_prompts": 12}
    first = calibration_ids(cfg, tok, cache_dir=tmp_path, generate=lambda ps: ["<think>ok</think> 1"] * len(ps),
                            model_key="m@1")

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    again = calibration_ids(cfg, tok, cache_dir=tmp_path, generate=None, model_key="m@1")
    assert torch.equal(first, again)
    with pytest.raises(UserError):      # another config is not in the cache: the hub is needed again
        calibration_ids({**cfg, "seed": 1}, tok, cache_dir=tmp_path, generate=None, model_key="m@1")


def test_schema_rejects_typos_and_bad_values():
    assert as_calib_config({"name": "toy"}) == CalibConfig(name="toy")
    with pytest.raises(UserError, match="calib.n_sample"):
        as_calib_config({"name": "toy", "n_sample": 3})
    with pytest.raises(UserError, match="allowed: pileval"):
        as_calib_config({"name": "pile"})
    with pytest.raises(UserError, match="calib.seq_len"):
        as_calib_config({"name": "toy", "seq_len": 0})
