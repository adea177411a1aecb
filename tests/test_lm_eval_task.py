"""lm-eval passthrough on an in-memory model, offline, with local-data task YAMLs (tests/fixtures/lm_eval/).

lm-eval's numbers are checked against log-likelihoods computed here directly from the same model,
so the test fails if the wrong model, tokenization or metric reaches the output.
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from harness.types import UserError
from tasks.lm_eval import LmEvalConfig, LmEvalTask, flatten_metrics

FIX = Path(__file__).resolve().parent / "fixtures" / "lm_eval"


def _rows(name):
    return [json.loads(line) for line in (FIX / name).open()]


@torch.no_grad()
def _loglik(model, tok, context_ids: list[int], target_ids: list[int]) -> float:
    ids = torch.tensor([context_ids + target_ids])
    logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    n = len(context_ids)
    return float(sum(logp[n - 1 + k, t] for k, t in enumerate(target_ids)))


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def task(**kw):
    return LmEvalTask(LmEvalConfig(name="lm_eval", include_path=str(FIX), **kw))


def test_metrics_match_direct_loglikelihoods(model_and_tok, tmp_path, monkeypatch):
    model, tok = model_and_tok
    monkeypatch.chdir(tmp_path)      # relative data_files must resolve against the include dir, not the cwd
    metrics = task(names=["rq_tiny_choice", "rq_tiny_ppl"]).evaluate_model(model, tok, tmp_path / "run")

    # multiple choice: context "{question} =", continuation " {choice}"; the argmax must hit the label
    hits = []
    for r in _rows("tiny_choice.jsonl"):
        ctx = _enc(tok, f"{r['question']} =")
        lls = [_loglik(model, tok, ctx, _enc(tok, f"{r['question']} = {c}")[len(ctx):]) for c in r["choices"]]
        hits.append(max(range(len(lls)), key=lls.__getitem__) == r["label"])
    assert metrics["rq_tiny_choice/acc"] == pytest.approx(sum(hits) / len(hits))

    # rolling log-likelihood of each whole document after the prefix token (EOS: the toy has no BOS)
    docs = [r["text"] for r in _rows("tiny_docs.jsonl")]
    total = sum(_loglik(model, tok, [tok.eos_token_id], _enc(tok, d)) for d in docs)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert metrics["rq_tiny_ppl/word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    assert metrics["rq_tiny_ppl/byte_perplexity"] == pytest.approx(math.exp(-total / n_bytes), rel=1e-4)
    assert metrics["rq_tiny_ppl/bits_per_byte"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-4)
    assert all(isinstance(v, float) for v in metrics.values())

    results = json.loads((tmp_path / "run" / "lm_eval_results.json").read_text())
    assert results["results"]["rq_tiny_choice"]["acc,none"] == metrics["rq_tiny_choice/acc"]
    logged = (tmp_path / "run" / "lm_eval_samples" / "rq_tiny_choice.jsonl").read_text().splitlines()
    assert [bool(json.loads(line)["acc"]) for line in logged] == hits


def test_in_memory_weights_are_what_gets_evaluated(model_and_tok, tmp_path):
    """A 'quantized' (here: perturbed) in-memory model must give different numbers: no reload from disk."""
    import copy
    model, tok = model_and_tok
    before = task(names=["rq_tiny_ppl"], log_samples=False).evaluate_model(model, tok, None)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.model.layers[0].mlp.parameters():
            p.mul_(0.0)
    after = task(names=["rq_tiny_ppl"], log_samples=False).evaluate_model(changed, tok, None)
    assert after["rq_tiny_ppl/word_perplexity"] != pytest.approx(before["rq_tiny_ppl/word_perplexity"])


def test_unknown_task_name_is_a_user_error_with_suggestions(model_and_tok):
    model, tok = model_and_tok
    with pytest.raises(UserError, match=r"'rq_tiny_chioce' is not an lm-eval task.*did you mean: rq_tiny_choice"):
        task(names=["rq_tiny_chioce"]).evaluate_model(model, tok, None)


def test_config_errors():
    with pytest.raises(UserError, match="task.names=\\[\\] is not allowed"):
        task(names=[])
    with pytest.raises(UserError, match="task.include_path='/no/such/dir': no such directory"):
        LmEvalTask(LmEvalConfig(name="lm_eval", include_path="/no/such/dir"))
    with pytest.raises(UserError, match="task.batch_size=0 is not allowed"):
        task(batch_size=0)


def test_flatten_metrics_names():
    flat = flatten_metrics({"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.5,
                                                  "exact_match_stderr,strict-match": "N/A", "acc,none": 0.25}}})
    assert flat == {"gsm8k/exact_match/strict-match": 0.5, "gsm8k/acc": 0.25}
