"""The shared training core: long traces are kept (never dropped silently), rows are cut without losing a
label, the loop keeps the state of the best validation loss, and Reasoning-QAT's default data are the fp
model's own traces on task training prompts, distinct from the calibration rows."""
import copy
import functools

import pytest
import torch

from harness.quant.state import StateFile
from harness.toy import arith
from harness.toy.tokenizer import build_tokenizer
from harness.train.data import (DataReport, cut_rows, examples_from_rows, generation_marker, holdout, prompt_prefix,
                                split_documents)
from harness.train.loop import LoopConfig, batch_order, lr_lambda, steps_for, train
from harness.types import UserError


@functools.lru_cache(maxsize=1)
def _tok():
    return build_tokenizer()


def _doc(tok, p, repeat=1):
    prompt = tok.apply_chat_template([{"role": "user", "content": p.question()}], tokenize=False,
                                     add_generation_prompt=True)
    resp = "<think>\n" + "\n".join(p.steps * repeat) + "\n</think>\n\\boxed{%d}" % p.answer
    return tok.encode(prompt, add_special_tokens=False), tok.encode(resp, add_special_tokens=False) + [tok.eos_token_id]


def test_long_traces_longer_than_a_row_are_kept_whole():
    tok = _tok()
    docs = [_doc(tok, p, repeat=8) for p in arith.problems("train", 6, 0)]
    flat = [t for pr, r in docs for t in pr + r]
    row = 64                                       # every document is longer than a row
    assert all(len(pr + r) > row for pr, r in docs)
    n = len(flat) // row
    ids = torch.tensor(flat[:n * row]).view(n, row)
    examples, report = examples_from_rows(ids, tok)
    assert report.documents == 6 and report.kept == 6 and report.dropped == 0 and report.dropped_tokens == 0
    for (x, y), (pr, r) in zip(examples[:5], docs[:5]):      # whole documents, loss on the response only
        assert x.tolist() == pr + r and y.tolist() == [-100] * len(pr) + r
    x, y = examples[5]                             # the last one, cut by the end of the data: kept up to the cut
    assert report.cut == 1 and x.tolist() == (docs[5][0] + docs[5][1])[:x.numel()]
    assert "6/6 documents kept (100.0%)" in report.line("data")


def test_cut_rows_keeps_every_label():
    tok = _tok()
    pr, r = _doc(tok, arith.problems("train", 1, 3)[0], repeat=10)
    x = torch.tensor(pr + r)
    y = torch.tensor([-100] * len(pr) + r)
    report = DataReport()
    rows = cut_rows([(x, y)], 40, report)
    assert report.split == 1 and all(a.numel() <= 40 for a, _ in rows)
    labelled = torch.cat([b for _, b in rows])
    assert int((labelled != -100).sum()) == len(r)       # no response token lost
    assert torch.equal(torch.cat([a for a, _ in rows]), x[-sum(a.numel() for a, _ in rows):])


def test_stream_starting_inside_a_document_drops_and_counts_the_piece():
    tok = _tok()
    (p1, r1), (p2, r2) = [_doc(tok, p) for p in arith.problems("train", 2, 1)]
    tail = p1[-3:] + r1                            # the rows start inside a document: no known prompt/response split
    report = DataReport()
    docs = split_documents(torch.tensor([tail + p2 + r2]), generation_marker(tok), tok.eos_token_id,
                           report=report, prefix=prompt_prefix(tok))
    assert [d.tolist() for d, _ in docs] == [p2 + r2]
    assert report.dropped_tokens == len(tail)


def test_loop_keeps_the_best_validation_state_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

    m = M()
    target = torch.randn(4, 4)
    examples = [(torch.tensor([i % 4, (i + 1) % 4]), torch.tensor([i % 4, (i + 1) % 4])) for i in range(16)]

    def loss_fn(mod, ids, mask, labels):      # distance to a target: validation on a far target gets worse
        return ((mod.lin.weight - target) ** 2).mean() + 0 * ids.sum()

    start = model.weight.detach().clone()

    def val_fn(mod, ids, mask, labels):          # the starting point is the validation optimum
        return ((mod.lin.weight - start) ** 2).mean()

    cfg = LoopConfig(steps=8, batch_size=2, warmup=0, eval_every=2, save_every=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def both(mod, ids, mask, labels):
        return loss_fn(mod, ids, mask, labels) if mod.training else val_fn(mod, ids, mask, labels)

    log = train(m, opt, both, examples, cfg, pad_id=0, val_examples=examples[:2], progress=False)
    assert [s for s, _ in log.val] == [0, 2, 4, 6, 8]
    assert log.best_step == 0 and log.val[-1][1] > 0      # training moved away from it: undone at the end
    assert torch.equal(model.weight.detach(), start)
    model.weight.data.copy_(start)
    log = train(m, torch.optim.SGD(model.parameters(), lr=0.5), both, examples,
                LoopConfig(steps=8, batch_size=2, eval_every=2, keep_best=False), pad_id=0,
                val_examples=examples[:2], progress=False)
    assert not torch.equal(model.weight.detach(), start)       # keep_best=false: the last state
    # resumable: killed at step 5, rerun -> the same log and weights as an uninterrupted run
    def run(path, stop_at=None):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 4)
        mm = M()
        mm.lin = lin
        o = torch.optim.AdamW(lin.parameters(), lr=0.1)
        return mm, train(mm, o, loss_fn, examples, cfg, pad_id=0, val_examples=examples[:2], progress=False,
                         state_file=StateFile(path, {"k": 1}), stop_at=stop_at)
    whole_m, whole = run(tmp_path / "a.pt")
    run(tmp_path / "b.pt", stop_at=5)
    resumed_m, resumed = run(tmp_path / "b.pt")
    assert resumed.resumed_at == 5 and resumed.losses == whole.losses and resumed.val == whole.val
    assert torch.equal(resumed_m.lin.weight, whole_m.lin.weight)


def test_schedule_helpers():
    assert steps_for(1.0, 2048, 8) == 256 and steps_for(0.5, 10, 4) == 2
    f = lr_lambda(2, 10, "cosine")
    assert f(0) == pytest.approx(1 / 3) and f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.0)
    assert lr_lambda(0, 10, "linear")(5) == pytest.approx(0.5) and lr_lambda(0, 10, "constant")(9) == 1.0
    order = batch_order(5, 12, 0)
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    train_ex, val_ex = holdout(list(range(10)), 3, 0)
    assert len(val_ex) == 3 and not set(train_ex) & set(val_ex)


def test_reasoning_qat_default_data_are_task_traces_apart_from_calibration(tmp_path):
    from transformers import AutoModelForCausalLM

    from harness.calib import calibration_ids
    from harness.quant.context import QuantContext
    from harness.quant.quantizer import QuantSpec
    from harness.toy.build import ensure_toy
    from methods.reasoning_qat import ReasoningQAT, ReasoningQATConfig
    path = ensure_toy("toy")
    tok = _tok()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = ReasoningQATConfig(name="reasoning_qat", task="arith", n_train=12, n_val=4)
    ids = calibration_ids({"name": "toy", "n_samples": 16, "seq_len": 128}, tok)
    ctx = QuantContext(spec=QuantSpec(bits=2), method_cfg=cfg, tokenizer=tok, calib=lambda: ids, progress=False,
                       cache_dir=tmp_path)
    train_ex, val_ex, report = ReasoningQAT(cfg).training_data(model, ctx, ids)
    assert (len(train_ex), len(val_ex), report.kept) == (12, 4, 16)
    text = tok.decode(ids.reshape(-1))
    prompts = [tok.decode(x[y == -100]) for x, y in train_ex + val_ex]
    qs = [p.split("Compute: ")[1].split("<")[0] for p in prompts]
    assert len(set(qs)) == 16 and not any(f"Compute: {q}<" in text for q in qs)      # distinct from calibration
    traces = [tok.decode(x[y != -100]) for x, y in train_ex]
    assert all("\\boxed{" in t for t in traces)            # the fp model's own (finished) reasoning traces
    # cached: a second call needs no generation (no generator would be reached)
    again, _, _ = ReasoningQAT(cfg).training_data(copy.deepcopy(model), ctx, ids)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, train_ex))


@pytest.mark.parametrize("node,match", [({"task": None}, "method.task=None"),
                                        ({"task": "gpqa_diamond"}, "no training split"),
                                        ({"data": "calib", "task": None, "rl": {"enabled": True}}, "method.task"),
                                        ({"data": "bogus"}, "method.data='bogus'")])
def test_task_data_needs_a_task_with_a_training_split(node, match):
    from methods.reasoning_qat import ReasoningQAT, ReasoningQATConfig, RLConfig
    kw = {"task": "arith", **node}
    if "rl" in kw:
        kw["rl"] = RLConfig(**kw["rl"])
    with pytest.raises(UserError, match=match):
        ReasoningQAT(ReasoningQATConfig(name="reasoning_qat", **kw))
