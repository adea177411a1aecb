"""Reasoning-QAT: step 0 is the PTQ model, KD training lowers the KD loss, a preempted run resumes to the
same final weights (QAT and GRPO), the GRPO pieces, config errors, and one pipeline run."""
import copy
import functools

import pytest
import torch

from harness import registry
from harness.calib import calibration_ids
from harness.quant import fakequant
from harness.quant.context import QuantContext
from harness.quant.quantizer import QuantSpec
from harness.types import UserError
from methods.reasoning_qat import (ReasoningQAT, ReasoningQATConfig, RLConfig, StateFile, TrainingStopped, collate,
                                   group_advantages, grpo_loss, kd_loss, train_qat)


@functools.lru_cache(maxsize=1)
def _toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.toy.build import ensure_toy
    path = ensure_toy("toy")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = calibration_ids({"name": "toy", "n_samples": 8, "seq_len": 128}, tok)
    return model, tok, ids


def _ctx(cfg, spec, tok, ids, cache_dir=None):
    return QuantContext(spec=spec, method_cfg=cfg, tokenizer=tok, calib=lambda: ids, progress=False,
                        cache_dir=cache_dir)


def _init(cfg, spec):
    base, tok, ids = _toy()
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    ReasoningQAT(cfg).ptq_init(model, _ctx(cfg, spec, tok, ids), ids)
    return model


@pytest.mark.parametrize("init,latent,bits", [("gptq", "projected", 2), ("gptq", "ptq", 3), ("rtn", "projected", 2)])
def test_step0_is_the_ptq_model(init, latent, bits):
    base, tok, ids = _toy()
    spec = QuantSpec(bits=bits, group_size=128)
    ptq = copy.deepcopy(base)
    cls = registry.get("method", init)
    pcfg = cls.Config(name=init)
    codes = cls(pcfg).quantize(ptq, _ctx(pcfg, spec, tok, ids)).layers

    cfg = ReasoningQATConfig(name="reasoning_qat", init=init, latent=latent, data="calib")
    model = _init(cfg, spec)
    mods = fakequant.fake_quant_modules(model)
    assert set(mods) == set(codes) and len(mods) == 28
    if latent == "projected":        # the latent really is the fp weight wherever it rounds to the PTQ code
        assert any(not torch.equal(m.weight, m.quantized_weight()) for m in mods.values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids[:4]).logits, ptq(input_ids=ids[:4]).logits)
    ptq_modules = dict(ptq.named_modules())
    for name, m in mods.items():
        assert torch.equal(m.quantized_weight().detach(), ptq_modules[name].weight)
    result = fakequant.detach(model)          # export at step 0: the PTQ codes and grid, unchanged
    for name, q in result.layers.items():
        assert torch.equal(q.codes, codes[name].codes)
        assert torch.equal(q.scale, codes[name].scale) and torch.equal(q.zero, codes[name].zero)
    assert not fakequant.fake_quant_modules(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids[:4]).logits, ptq(input_ids=ids[:4]).logits)


def test_kd_training_lowers_the_kd_loss():
    base, tok, ids = _toy()
    spec = QuantSpec(bits=2, group_size=128)
    cfg = ReasoningQATConfig(name="reasoning_qat", steps=20, lr=1e-4, warmup=2, batch_size=4, data="calib")
    model = _init(cfg, spec)
    examples, _ = ReasoningQAT(cfg).examples(ids, tok)
    x, mask, y = collate(examples, 0, "cpu")

    def kd():
        with torch.no_grad():
            return float(kd_loss(model(input_ids=x, attention_mask=mask).logits,
                                 base(input_ids=x, attention_mask=mask).logits, y))
    before = kd()
    out = train_qat(model, copy.deepcopy(base), examples, cfg, pad_id=0, state_file=StateFile(None, {}),
                    progress=False)
    after = kd()
    assert len(out["losses"]) == 20
    assert after < 0.8 * before, (before, after)


def test_kd_loss_is_the_forward_kl():
    s = torch.randn(1, 3, 5)
    t = torch.randn(1, 3, 5)
    labels = torch.tensor([[-100, 1, 2]])
    pt, ls = torch.softmax(t[0, :2] / 2, -1), torch.log_softmax(s[0, :2] / 2, -1)
    expect = (pt * (pt.log() - ls)).sum(-1).mean() * 4
    assert torch.allclose(kd_loss(s, t, labels, temperature=2.0), expect, atol=1e-6)
    assert float(kd_loss(t, t, labels)) == pytest.approx(0.0, abs=1e-6)


def _final(cfg, spec, cache_dir, stop_at=None):
    base, tok, ids = _toy()
    model = copy.deepcopy(base)
    result = ReasoningQAT(cfg).quantize(model, _ctx(cfg, spec, tok, ids, cache_dir), stop_at=stop_at)
    return model, result


def test_preempted_training_resumes_to_the_same_weights(tmp_path):
    spec = QuantSpec(bits=3, group_size=128)
    cfg = ReasoningQATConfig(name="reasoning_qat", steps=6, batch_size=2, lr=3e-4, warmup=1, save_every=2,
                             learn_scales=True, scale_lr=1e-4, task="arith", data="calib", n_val=4, eval_every=2,
                             rl=RLConfig(enabled=True, steps=2, prompts_per_step=2, group_size=4, max_new_tokens=64,
                                         lr=1e-4, save_every=1, kl_beta=0.05, n_val=4, eval_every=1))
    whole, r_whole = _final(cfg, spec, tmp_path / "a")
    with pytest.raises(TrainingStopped):
        _final(cfg, spec, tmp_path / "b", stop_at=3)            # preempted in QAT (state saved at step 3)
    with pytest.raises(TrainingStopped):
        _final(cfg, spec, tmp_path / "b", stop_at=7)            # resumed, preempted again after RL step 1
    resumed, r_resumed = _final(cfg, spec, tmp_path / "b")
    info = r_resumed.info["reasoning_qat"]
    assert info["qat_resumed_at"] == 6 and info["rl_resumed_at"] == 1
    assert info["qat_losses"] == r_whole.info["reasoning_qat"]["qat_losses"]
    assert info["rl_rewards"] == r_whole.info["reasoning_qat"]["rl_rewards"]
    assert info["rl_val"] == r_whole.info["reasoning_qat"]["rl_val"] and [s for s, _ in info["rl_val"]] == [0, 1, 2]
    assert info["qat_val"] == r_whole.info["reasoning_qat"]["qat_val"]
    for name, q in r_whole.layers.items():
        assert torch.equal(q.codes, r_resumed.layers[name].codes) and torch.equal(q.scale, r_resumed.layers[name].scale)
    for (n, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    assert not list((tmp_path / "b").rglob("*.pt"))            # state files removed once finished


def test_grpo_keeps_its_start_when_validation_never_improves():
    """A destructive RL step (huge lr) lowers the held-out accuracy: the model ends where RL started."""
    from methods.reasoning_qat import make_task, train_grpo
    base, tok, ids = _toy()
    spec = QuantSpec(bits=2, group_size=128)
    cfg = ReasoningQATConfig(name="reasoning_qat", task="arith", data="calib",
                             rl=RLConfig(enabled=True, steps=2, prompts_per_step=4, group_size=4, max_new_tokens=64,
                                         lr=0.05, n_val=16, eval_every=1))
    model = _init(cfg, spec)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = train_grpo(model, tok, make_task("arith"), cfg, device=torch.device("cpu"), state_file=StateFile(None, {}),
                     progress=False)
    assert [s for s, _ in out["val"]] == [0, 1, 2] and out["val"][-1][1] < out["val"][0][1]
    assert out["best_step"] == 0 and max(v for _, v in out["val"]) == out["val"][0][1]     # ties keep the earlier
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_group_advantages_and_clipped_objective():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.equal(adv[1], torch.zeros(4))                  # a group that agrees carries no signal
    # ratio 1: the gradient raises the log-prob of positive-advantage tokens and lowers the others
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.long)
    grpo_loss(logp, torch.zeros(2, 3), None, torch.tensor([1.0, -1.0]), mask, 0.2, 0.0).backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()
    # beyond the clip range with a positive advantage: no gradient
    logp2 = torch.full((1, 3), 0.5, requires_grad=True)
    grpo_loss(logp2, torch.zeros(1, 3), None, torch.tensor([1.0]), torch.ones(1, 4, dtype=torch.long),
              0.2, 0.0).backward()
    assert torch.equal(logp2.grad, torch.zeros(1, 3))


@pytest.mark.parametrize("key,value,match", [("objective", "mse", "method.objective"),
                                             ("init", "fp", "method.init"),
                                             ("latent", "mid", "method.latent"),
                                             ("grad_accum", 0, "method.grad_accum")])
def test_bad_config_names_the_key(key, value, match):
    with pytest.raises(UserError, match=match):
        ReasoningQAT(ReasoningQATConfig(name="reasoning_qat", **{key: value}))
    with pytest.raises(UserError, match="method.init_cfg"):
        ReasoningQAT(ReasoningQATConfig(name="reasoning_qat", init="gptq", init_cfg={"dampp": 0.1}))
    with pytest.raises(UserError, match="method.init_cfg.act_bits=4 is not allowed"):
        ReasoningQAT(ReasoningQATConfig(name="reasoning_qat", init="sliderquant", init_cfg={"act_bits": 4}))
    with pytest.raises(UserError, match="method.data.name"):
        ReasoningQAT(ReasoningQATConfig(name="reasoning_qat", data={"name": "bogus"}))
    with pytest.raises(UserError, match="method.rl.group_size"):
        ReasoningQAT(ReasoningQATConfig(name="reasoning_qat", rl=RLConfig(enabled=True, group_size=1)))


def test_pipeline_run_exports_the_trained_codes(rq, tmp_path):
    r = rq("method=reasoning_qat", "quant.bits=3", "method.steps=2", "method.batch_size=2", "calib.n_samples=4",
           "method.n_train=6", "method.n_val=2",
           "method.rl.enabled=true", "method.rl.steps=1", "method.rl.prompts_per_step=2", "method.rl.group_size=2",
           "method.rl.max_new_tokens=32", "task.limit=8", f"results_dir={tmp_path}", "export=packed")
    assert r["method"] == "reasoning_qat" and r["bits"] == 3
    from harness.quant.export import load_checkpoint, read_provenance
    prov = read_provenance(r["checkpoint"]["checkpoint"])
    assert prov["method"] == "reasoning_qat" and prov["quantized_layers"] == 28
    model = load_checkpoint(r["checkpoint"]["checkpoint"])
    w = model.model.layers[0].mlp.down_proj.weight           # decodes onto a 3-bit grid: <= 8 levels per group
    assert all(len(torch.unique(w[row, :128])) <= 8 for row in range(4))
