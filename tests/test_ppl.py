"""task=ppl: GPTQ-style perplexity windows and arithmetic, offline on the toy (local text files)."""
import json
import math
import random

import pytest
import torch

from harness.types import UserError
from tasks.ppl import PplConfig, PplTask


def _text(n=120, seed=1):
    rng = random.Random(seed)
    return [f"{a}+{b}={a + b}" for a, b in ((rng.randint(1, 99), rng.randint(1, 99)) for _ in range(n))]


def task(**kw):
    return PplTask(PplConfig(name="ppl", **kw))


def test_wikitext_windows_and_ppl_match_the_models_own_loss(model_and_tok, tmp_path):
    model, tok = model_and_tok
    f = tmp_path / "wiki.txt"
    f.write_text("\n\n".join(_text()))
    t = task(data_files=str(f), seqlen=64)
    ids = tok(f.read_text(), return_tensors="pt").input_ids[0]
    w = t.windows(tok)
    n = len(ids) // 64
    assert w.shape == (n, 64) and torch.equal(w.reshape(-1), ids[: n * 64])      # non-overlapping, tail dropped
    # reference: the model's own (HF) mean loss per window; GPTQ's formula is exp(mean of those)
    with torch.no_grad():
        ref = math.exp(sum(model(x[None], labels=x[None]).loss.item() for x in w) / n)
    m = t.evaluate_model(model, tok)
    assert m["ppl"] == pytest.approx(ref, rel=1e-5) and (m["n_windows"], m["seqlen"]) == (n, 64)
    assert task(data_files=str(f), seqlen=64, batch_size=3).evaluate_model(model, tok)["ppl"] == pytest.approx(
        m["ppl"], rel=1e-5)
    assert task(data_files=str(f), seqlen=64, n_windows=2).windows(tok).shape == (2, 64)


def test_wikitext_rows_are_joined_by_blank_lines(model_and_tok, tmp_path):
    _, tok = model_and_tok
    rows = _text(80)
    f = tmp_path / "wiki.jsonl"
    f.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    ids = tok("\n\n".join(rows), return_tensors="pt").input_ids[0]
    w = task(data_files=str(f), seqlen=32).windows(tok)
    assert torch.equal(w.reshape(-1), ids[: w.numel()])


def test_c4_windows_are_gptq_samples(model_and_tok, tmp_path):
    """random.seed(0); per window: draw docs until one has >= seqlen tokens, then a random window inside it."""
    _, tok = model_and_tok
    docs = ["\n".join(_text(n, seed=n)) for n in (2, 30, 3, 40, 25)]      # docs 0 and 2 are too short
    f = tmp_path / "c4.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    w = task(data_files=str(f), dataset="c4", seqlen=48, n_windows=5).windows(tok)
    assert w.shape == (5, 48)
    enc = [tok(d, return_tensors="pt").input_ids[0] for d in docs]
    rng = random.Random(0)
    for row in w:
        while True:
            k = rng.randint(0, len(docs) - 1)
            if len(enc[k]) >= 48:
                break
        i = rng.randint(0, len(enc[k]) - 48 - 1)
        assert torch.equal(row, enc[k][i: i + 48])
    assert torch.equal(task(data_files=str(f), dataset="c4", seqlen=48, n_windows=5).windows(tok), w)


def test_errors_name_the_key(model_and_tok, tmp_path):
    _, tok = model_and_tok
    with pytest.raises(UserError, match="task.dataset='ptb' is not allowed; allowed: wikitext2, c4, c4_new"):
        task(dataset="ptb")
    f = tmp_path / "short.txt"
    f.write_text("1+1=2")
    with pytest.raises(UserError, match="shorter than one task.seqlen=2048 window"):
        task(data_files=str(f)).windows(tok)
    with pytest.raises(UserError, match="no C4 document is 2048 tokens long"):
        task(data_files=str(f), dataset="c4").windows(tok)
    with pytest.raises(UserError, match="no such file"):
        task(data_files=str(tmp_path / "none.txt")).windows(tok)


def test_through_the_cli(tmp_path):
    from hydra import compose, initialize_config_dir
    from harness.cli import CONF_DIR, execute
    f = tmp_path / "wiki.txt"
    f.write_text("\n\n".join(_text()))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["task=ppl", "method=fp", f"task.data_files={f}", "task.seqlen=64",
                                           f"results_dir={tmp_path / 'r'}", f"cache_dir={tmp_path / 'c'}",
                                           "progress=false", "device=cpu"])
    result = execute(cfg)
    assert result["metrics"]["ppl"] > 1 and result["metrics"]["seqlen"] == 64
    assert result["task_info"]["dataset"] == "wikitext2"
