"""GPTQ and AWQ: better than round-to-nearest where they should be, exact grids, folding preserves the function."""
import copy

import pytest
import torch
import torch.nn as nn

from harness import registry
from harness.quant.context import QuantContext
from harness.quant.quantizer import QuantSpec, compute_qparams, dequantize, quantize_weight
from harness.toy.tokenizer import build_tokenizer
from harness.toy.train import new_model
from harness.types import UserError
from methods.awq import AWQConfig, fold_scale, gqa_expand, qdq, search_clip, search_scale
from methods.gptq import GPTQConfig, gptq_quantize, hessian_from


def _inputs(n, width, seed, outliers=()):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(width) + torch.randn(width, width, generator=g) / width ** 0.5
    x = torch.randn(n, width, generator=g) @ mix * (0.5 + torch.rand(width, generator=g))
    for c in outliers:
        x[:, c] *= 25.0
    return x


def _out_err(x, w_hat, w):
    return float(((x @ (w_hat - w).T) ** 2).mean())


# ------------------------------------------------------------------ GPTQ

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec,act_order", [
    (QuantSpec(bits=4, group_size=128), True),
    (QuantSpec(bits=3, group_size=128), True),
    (QuantSpec(bits=3, group_size=64), False),
    (QuantSpec(bits=4, group_size=-1, sym=True), True),
    (QuantSpec(bits=2, group_size=32), True),
    (QuantSpec(bits=8, group_size=128, sym=True), True),
])
def test_gptq_beats_rtn_on_output_error(seed, spec, act_order):
    torch.manual_seed(seed)
    w = torch.randn(96, 256)
    x = _inputs(1024, 256, seed)
    q, w_gptq = gptq_quantize(w, hessian_from([x]), spec, act_order=act_order)
    _, w_rtn = quantize_weight(w, spec)
    assert _out_err(x, w_gptq, w) < 0.8 * _out_err(x, w_rtn, w)
    # the returned weight is exactly the decoded codes, and the codes fit the bit width
    assert torch.equal(w_gptq, dequantize(q.codes, q.scale, q.zero, spec.group_size))
    assert int(q.codes.max()) <= spec.maxq and q.codes.dtype == torch.uint8


def test_gptq_act_order_uses_static_groups_from_original_weights():
    torch.manual_seed(0)
    w, x = torch.randn(32, 256), _inputs(512, 256, 0)
    spec = QuantSpec(bits=3, group_size=64)
    q, _ = gptq_quantize(w, hessian_from([x]), spec, act_order=True)
    scale, zero = compute_qparams(w, spec)
    assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)


def test_gptq_mse_clip_and_dead_columns():
    torch.manual_seed(0)
    w, x = torch.randn(32, 128), _inputs(512, 128, 3)
    x[:, 5] = 0                                             # a dead input channel
    spec = QuantSpec(bits=3, group_size=32)
    h = hessian_from([x])
    q_plain, w_plain = gptq_quantize(w, h, spec)
    q_mse, w_mse = gptq_quantize(w, h, spec, mse=dict(grid=50, max_shrink=0.5, norm=2.4))
    assert (q_mse.scale <= q_plain.scale + 1e-7).all() and (q_mse.scale < q_plain.scale).any()
    assert _out_err(x, w_mse, w) < 1.5 * _out_err(x, w_plain, w)
    assert torch.isfinite(w_mse).all() and float(w_plain[:, 5].abs().max()) == 0.0


# ------------------------------------------------------------------ AWQ building blocks

class _NormLinear(nn.Module):
    """RMSNorm-like per-channel scale followed by two linears (a qkv / gate_up style group)."""

    def __init__(self, width, out, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(1 + 0.1 * torch.randn(width, generator=g))
        self.a = nn.Linear(width, out, bias=False)
        self.b = nn.Linear(width, out, bias=False)
        self.a.weight.data = torch.randn(out, width, generator=g) / width ** 0.5
        self.b.weight.data = torch.randn(out, width, generator=g) / width ** 0.5

    def forward(self, x):
        h = x * self.norm.weight
        return torch.cat([self.a(h), self.b(h)], -1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_awq_scales_beat_rtn_with_outlier_channels(seed):
    width = 256
    block = _NormLinear(width, 128, seed)
    x = _inputs(512, width, seed, outliers=(3, 77, 200))
    ref = block(x).detach()
    spec = QuantSpec(bits=3, group_size=128)

    def err():
        return float(((block(x) - ref) ** 2).mean())

    rtn = copy.deepcopy(block)
    for lin in (rtn.a, rtn.b):
        lin.weight.data = quantize_weight(lin.weight.data, spec)[1]
    with torch.no_grad():
        rtn_err = float(((rtn(x) - ref) ** 2).mean())

    with torch.no_grad():
        imp = (x * block.norm.weight).abs().mean(0)
        res = search_scale(imp, [block.a, block.b], err, spec, grid=20)
        assert res.base_loss == pytest.approx(rtn_err, rel=1e-4)      # ratio 0 is plain RTN
        fold_scale(block.norm, [block.a, block.b], res.scale)
        assert torch.allclose(block(x), ref, atol=1e-4)                 # folding keeps the function
        for lin in (block.a, block.b):
            lin.weight.data = qdq(lin.weight.data, spec, lin.weight.dtype)
        awq_err = err()
    assert res.ratio > 0 and awq_err < 0.7 * rtn_err


def test_awq_clip_search_lowers_error():
    torch.manual_seed(0)
    w, x = torch.randn(64, 256), _inputs(512, 256, 0)
    spec = QuantSpec(bits=3, group_size=128)
    ratio = search_clip(w, x, spec, grid=20, max_shrink=0.5)
    assert ratio.shape == (64, 2) and (ratio <= 1).all() and (ratio >= 0.55 - 1e-6).all() and (ratio < 1).any()
    clipped = qdq(w, spec, w.dtype, clip_ratio=ratio)
    assert _out_err(x, clipped, w) < _out_err(x, qdq(w, spec, w.dtype), w)


def test_gqa_fold_into_v_keeps_attention_output():
    model = new_model(build_tokenizer(), seed=0).eval()            # 4 query heads, 2 kv heads
    attn = model.model.layers[0].self_attn
    v, o = attn.v_proj, attn.o_proj
    expand = gqa_expand(attn, v, o)
    assert expand.shape == (o.in_features,) and int(expand.max()) == v.out_features - 1
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        fold_scale(v, [o], torch.rand(v.out_features) * 4 + 0.25, expand)
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)


# ------------------------------------------------------------------ the methods on a model

@pytest.fixture(scope="module")
def toy_and_ids():
    tok = build_tokenizer()
    model = new_model(tok, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    return model, torch.randint(0, len(tok), (8, 64), generator=g)


def _run(method, model, ids, spec, **over):
    cls = registry.get("method", method)
    cfg = cls.Config(name=method, **over)
    m = copy.deepcopy(model)
    res = cls(cfg).quantize(m, QuantContext(spec=spec, method_cfg=cfg, calib=lambda: ids, progress=False))
    with torch.no_grad():
        err = float(((m.model(ids).last_hidden_state - model.model(ids).last_hidden_state) ** 2).mean())
    return m, res, err


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_method_beats_rtn_on_model_output(toy_and_ids, method):
    model, ids = toy_and_ids
    spec = QuantSpec(bits=3, group_size=128)
    _, _, rtn_err = _run("rtn", model, ids, spec)
    m, res, err = _run(method, model, ids, spec)
    assert err < 0.9 * rtn_err
    assert len(res.layers) == 7 * model.config.num_hidden_layers
    for name, q in res.layers.items():          # the model holds exactly the decoded codes
        w = m.get_submodule(name).weight
        assert torch.equal(w, dequantize(q.codes, q.scale, q.zero, q.group_size).to(w.dtype))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_include_exclude_and_bits_are_honoured(toy_and_ids, method):
    model, ids = toy_and_ids
    spec = QuantSpec(bits=2, group_size=32, sym=True)
    m, res, _ = _run(method, model, ids[:2], spec, include=[r"^model\.layers\.[01]\."], exclude=[r"down_proj$"])
    assert set(res.layers) == {f"model.layers.{i}.{n}" for i in (0, 1) for n in
                               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj")}
    assert all(q.bits == 2 and q.group_size == 32 and q.sym for q in res.layers.values())
    for i in (2, 3):        # layers outside include are untouched
        assert torch.equal(m.model.layers[i].mlp.up_proj.weight, model.model.layers[i].mlp.up_proj.weight)
    # an excluded linear keeps its weights (AWQ skips the down group whose only linear is excluded)
    assert torch.equal(m.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)


def test_config_validation():
    with pytest.raises(UserError, match="method.groups"):
        registry.get("method", "awq")(AWQConfig(name="awq", groups=["qkv", "mlp"]))
    with pytest.raises(UserError, match="method.damp"):
        registry.get("method", "gptq")(GPTQConfig(name="gptq", damp=0.0))
    cls = registry.get("method", "gptq")
    assert cls.uses_calibration and cls.quantizes


def test_stacked_linears_solve_exactly_like_separate_ones():
    # q/k/v (and gate/up) share a Hessian; GPTQ treats rows independently, so stacking them is exact.
    torch.manual_seed(0)
    x = _inputs(512, 128, 5)
    h = hessian_from([x])
    w1, w2 = torch.randn(48, 128), torch.randn(16, 128)
    spec = QuantSpec(bits=3, group_size=32)
    q, deq = gptq_quantize(torch.cat([w1, w2]), h, spec)
    q1, d1 = gptq_quantize(w1, h, spec)
    assert torch.equal(deq[:48], d1) and torch.equal(q.codes[:48], q1.codes) and torch.equal(q.scale[:48], q1.scale)


def test_awq_fast_paths_match_the_reference_computation():
    from harness.quant.quantizer import fake_quantize
    from methods.awq import GramLoss
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for spec in (QuantSpec(4, 128), QuantSpec(3, 64, sym=True), QuantSpec(2, -1)):
        ratio = 0.6 + 0.4 * torch.rand(64, 256 // (spec.group_size if spec.group_size > 0 else 256))
        assert torch.equal(qdq(w, spec, torch.float32), fake_quantize(w, spec))
        assert torch.equal(qdq(w, spec, torch.float32, clip_ratio=ratio),
                           fake_quantize(w, spec, *compute_qparams(w, spec, clip_ratio=ratio)))
    lin = nn.Linear(256, 64, bias=False)
    xs = [_inputs(300, 256, 1), _inputs(200, 256, 2)]
    loss = GramLoss(xs, lin)
    w0 = lin.weight.data.clone()
    lin.weight.data = qdq(w0, QuantSpec(3, 128), torch.float32)
    direct = float(sum(((x @ (lin.weight.data - w0).T) ** 2).sum() for x in xs) / (500 * 64))
    assert loss() == pytest.approx(direct, rel=1e-4)
