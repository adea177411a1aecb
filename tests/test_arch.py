"""Architecture descriptors (harness/arch.py), conformance per family on tiny random models.

Every family: each fold with random scales preserves the logits, rotation preserves them where supported
(and is refused elsewhere), W8 RTN/GPTQ/AWQ stay close to full precision and quantize every selected weight
(MoE experts included), and the exported checkpoint's weights lie on their grid.
"""
import copy

import pytest
import torch

from harness import arch, registry
from harness.quant import fold as folding
from harness.quant.context import QuantContext
from harness.quant.export import load_checkpoint, save_checkpoint
from harness.quant.quantizer import QuantSpec, dequantize
from harness.quant.rotation import rotate_model
from harness.types import QuantResult, UserError
from tests.tiny_families import FAMILY_TYPES, tiny_model, tokens

MOE = ["qwen3_moe", "mixtral", "qwen3_next"]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


# ------------------------------------------------------------------ folds and rotation

@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_fold_with_random_scales_preserves_the_logits(model_type):
    m = tiny_model(model_type, num_key_value_heads=4)       # MHA: the v->o fold exists too
    ids = tokens()
    ref = _logits(m, ids)
    fam = arch.family_of(m)
    applied = set()
    g = torch.Generator().manual_seed(1)
    for layer in m.model.layers:
        for f in arch.layer_folds(fam, layer):
            s = torch.rand(folding.channels(layer, f, m.config), generator=g, dtype=torch.float64) * 1.5 + 0.25
            folding.apply(layer, fam, f, s, m.config)
            applied.add(f.name)
            assert _rel(_logits(m, ids), ref) <= 1e-5, f.name
    expected = {"o", "down"} if fam.post_norm else {"qkv", "o", "gate_up", "down"}
    assert applied == expected


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3"])
def test_gqa_o_fold_with_one_scale_per_kv_channel_preserves_the_logits(model_type):
    m = tiny_model(model_type)                  # 4 query heads over 2 kv heads
    ids = tokens()
    ref = _logits(m, ids)
    fam = arch.family_of(m)
    layer = m.model.layers[0]
    f = next(f for f in arch.layer_folds(fam, layer) if f.name == "o")
    (n,) = folding.channels(layer, f, m.config)
    expand = folding.gqa_expand(m.config, n, arch.resolve(layer, f.linears[0]).in_features)
    assert expand is not None and n == 2 * 16
    folding.apply(layer, fam, f, torch.rand(n, dtype=torch.float64) + 0.5, m.config, expand)
    assert _rel(_logits(m, ids), ref) <= 1e-5


def test_the_old_post_norm_fold_would_change_olmo():
    """What the descriptors prevent: a gate_up scale folded into OLMo's post_attention_layernorm (which
    normalises the attention output, not the MLP input) changes the function."""
    m = tiny_model("olmo3")
    ids = tokens()
    ref = _logits(m, ids)
    layer = m.model.layers[0]
    s = torch.rand(64, dtype=torch.float64) + 0.5
    folding.divide_outputs(layer.post_attention_layernorm, s)
    folding.multiply_inputs([layer.mlp.gate_proj, layer.mlp.up_proj], s)
    assert _rel(_logits(m, ids), ref) > 1e-3
    assert [f.name for f in arch.layer_folds(arch.family_of(m), layer)] == ["o", "down"]


def test_one_plus_w_norm_fold():
    """Gemma's x̂·(1 + w): folding s must give (1 + w') = (1 + w) / s, not w' = w / s."""
    m = tiny_model("gemma2")
    ids = tokens()
    ref = _logits(m, ids)
    layer = m.model.layers[0]
    s = torch.rand(64, dtype=torch.float64) + 0.5
    wrong = copy.deepcopy(m)
    folding.divide_outputs(wrong.model.layers[0].input_layernorm, s, norm_offset=0.0)
    folding.multiply_inputs([wrong.model.layers[0].self_attn.q_proj, wrong.model.layers[0].self_attn.k_proj,
                             wrong.model.layers[0].self_attn.v_proj], s)
    assert _rel(_logits(wrong, ids), ref) > 1e-3
    f = arch.layer_folds(arch.family_of(m), layer)[0]
    folding.apply(layer, arch.family_of(m), f, s, m.config)
    assert _rel(_logits(m, ids), ref) <= 1e-5


ROTATABLE = [t for t in FAMILY_TYPES if arch.family_of(tiny_model(t)).rotation is not None]


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_rotation_preserves_logits_or_is_refused(model_type):
    m = tiny_model(model_type)
    ids = tokens()
    ref = _logits(m, ids)
    if model_type not in ROTATABLE:
        with pytest.raises(UserError, match=f"cannot apply to model_type '{model_type}'"):
            rotate_model(m)
        return
    rotate_model(m, seed=0)
    assert _rel(_logits(m, ids), ref) <= 1e-5


def test_rotation_support_is_what_the_descriptors_say():
    assert set(ROTATABLE) == {"llama", "mistral", "qwen2", "qwen3", "granite", "phi3"}


# ------------------------------------------------------------------ refusals before loading

def test_unknown_family_and_unfit_methods_refuse_in_one_line():
    from transformers import GPT2Config
    with pytest.raises(UserError) as e:
        arch.check_method(GPT2Config(), "awq")
    msg = str(e.value)
    assert "\n" not in msg and "method=awq" in msg and "'gpt2'" in msg and "llama" in msg and "olmo3" in msg
    for method in ("reasoning_qat", "sliderquant", "quantlrm"):
        with pytest.raises(UserError, match=f"method={method} cannot apply to model_type 'qwen3_moe'.*supported for "
                                            f"this family: rtn, gptq, awq"):
            arch.check_method(tiny_model("qwen3_moe").config, method)
    with pytest.raises(UserError, match="model_type 'gemma2'.*rotation is supported for"):
        arch.check_method(tiny_model("gemma2").config, "sliderquant", rotate=True)
    assert arch.check_method(tiny_model("phi3").config, "sliderquant", rotate=True).name == "phi3"


def test_coverage_refuses_a_label_on_full_precision_weights():
    m = tiny_model("qwen3_moe", dtype=torch.float32)
    sel = arch.selected_weights(m, [r"^model\.layers\.\d+\..*"])
    assert "model.layers.0.mlp.experts.gate_up_proj" in sel and not any(".mlp.gate" == n[-9:] for n in sel)
    linears_only = {n for n, w in sel.items() if isinstance(w, torch.nn.Linear)}
    with pytest.raises(UserError, match=r"W4.*left in full precision .*mlp\.experts"):
        arch.check_coverage(m, linears_only, [r"^model\.layers\.\d+\..*"], [], "rtn-W4")
    cov = arch.check_coverage(m, set(sel), [r"^model\.layers\.\d+\..*"], [], "rtn-W4")
    assert cov["fraction_selected"] == 1.0 and 0.98 < cov["fraction_layer_weights"] < 1.0     # the router stays fp


def test_next_keeps_its_gates_in_full_precision():
    m = tiny_model("qwen3_next", dtype=torch.float32)
    sel = arch.selected_weights(m, [r".*"])
    assert not any(n.endswith(("shared_expert_gate", "mlp.gate")) for n in sel)
    assert "model.layers.1.mlp.shared_expert.down_proj" in sel and "model.layers.0.linear_attn.out_proj" in sel


# ------------------------------------------------------------------ methods end to end

def _run(model, method, ids, bits=8, **over):
    cls = registry.get("method", method)
    cfg = cls.Config(name=method, **over)
    res = cls(cfg).quantize(model, QuantContext(spec=QuantSpec(bits=bits, group_size=32), method_cfg=cfg,
                                                calib=lambda: ids, progress=False))
    return res, cfg


def _on_grid(model, res: QuantResult):
    modules = dict(model.named_modules())
    for name, q in res.layers.items():
        w = modules[name].weight if name in modules else model.get_parameter(name).view(-1, q.codes.shape[1])
        assert torch.equal(w, dequantize(q.codes, q.scale, q.zero, q.group_size).to(w.dtype)), name


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_w8_methods_stay_close_and_quantize_every_selected_weight(model_type, method):
    m0 = tiny_model(model_type, dtype=torch.float32)
    ids = tokens(8, 32)
    ref = _logits(m0, ids)
    m = copy.deepcopy(m0)
    res, cfg = _run(m, method, ids)
    cov = arch.check_coverage(m, set(res.layers), cfg.include, cfg.exclude, method)
    assert cov["fraction_selected"] == 1.0
    out = _logits(m, ids)
    assert float((out - ref).norm() / ref.norm()) < 0.03
    if model_type in MOE:
        q = res.layers["model.layers.0.mlp.experts.gate_up_proj"]
        assert q.codes.shape[0] == m.model.layers[0].mlp.experts.gate_up_proj.shape[0] * \
            m.model.layers[0].mlp.experts.gate_up_proj.shape[1]
    _on_grid(m, res)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gemma3_text", "olmo3", "qwen3_moe", "qwen3_5_text"])
def test_exported_checkpoint_weights_lie_on_their_grid(model_type, tmp_path):
    m = tiny_model(model_type, dtype=torch.float32)
    res, _ = _run(m, "rtn", tokens(), bits=4)
    save_checkpoint(m, None, res, tmp_path / "fake", "fake")
    back = load_checkpoint(tmp_path / "fake")
    _on_grid(back, res)
    if model_type in ("llama", "phi3", "qwen3_moe"):         # packed MoE: tests/test_moe_packed.py
        save_checkpoint(m, None, res, tmp_path / "packed", "packed")
        _on_grid(load_checkpoint(tmp_path / "packed"), res)


# ------------------------------------------------------------------ MoE GPTQ

def test_gptq_experts_use_the_tokens_routed_to_each_and_fall_back_to_rtn():
    from methods.gptq import gptq_quantize, hessian_from
    from harness.quant.quantizer import quantize_weight
    m0 = tiny_model("qwen3_moe", dtype=torch.float32, num_hidden_layers=1)
    ids = tokens(8, 32)
    m = copy.deepcopy(m0)
    res, _ = _run(m, "gptq", ids, bits=4, expert_min_tokens=0.0)
    # Reference for expert 1's gate_up: its routed tokens, taken from the (quantized-attention) model itself.
    seen = {}
    layer = m.model.layers[0]
    h = layer.mlp.experts.register_forward_pre_hook(lambda mod, a: seen.setdefault("x", a))
    w_fp = m0.model.layers[0].mlp.experts.gate_up_proj.data[1].clone()
    with torch.no_grad():
        m(ids)
    h.remove()
    x, idx = seen["x"][0], seen["x"][1]
    xe = x[(idx == 1).any(-1)]
    q, _ = gptq_quantize(w_fp, hessian_from([xe]), QuantSpec(bits=4, group_size=32))
    got = res.layers["model.layers.0.mlp.experts.gate_up_proj"]
    rows = w_fp.shape[0]
    # same Hessian up to summation order: the codes agree but for rare rounding ties
    assert (got.codes[rows:2 * rows] == q.codes).float().mean() > 0.99
    assert sum(res.info["expert_tokens"]["model.layers.0.mlp.experts.gate_up_proj"]) == ids.numel() * 2   # top-2
    # Too few routed tokens: round-to-nearest, recorded (GPTQModel's Fallback(RTN, "0.5%")).
    m = copy.deepcopy(m0)
    res, _ = _run(m, "gptq", ids, bits=4, expert_min_tokens=0.9)
    assert len(res.info["experts_rtn_fallback"]) == 2 * 4
    rtn, _ = quantize_weight(m0.model.layers[0].mlp.experts.down_proj.data[2], QuantSpec(bits=4, group_size=32))
    d = res.layers["model.layers.0.mlp.experts.down_proj"]
    n = rtn.codes.shape[0]
    assert torch.equal(d.codes[2 * n:3 * n], rtn.codes)


# ------------------------------------------------------------------ had-K rotation matrices

@pytest.mark.parametrize("n", [12, 20, 28, 36, 96, 1536, 2560, 3584, 5120])
def test_non_power_of_two_widths_get_a_hadamard_rotation(n):
    from harness.quant.rotation import hadamard, random_orthogonal
    h = hadamard(n)
    assert torch.equal(h.abs(), torch.ones_like(h)) and torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    q = random_orthogonal(n, seed=1)
    assert torch.allclose(q.abs(), torch.full_like(q, n ** -0.5))      # had-K, not a dense QR matrix
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_widths_without_a_hadamard_fall_back_to_qr():
    from harness.quant.rotation import hadamard, random_orthogonal
    assert hadamard(90) is None                     # 90 = 2 mod 4: no Hadamard matrix exists
    q = random_orthogonal(90, seed=0)
    assert torch.allclose(q @ q.T, torch.eye(90, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "olmo3", "phi3", "gemma2"])
def test_w3_awq_beats_rtn_with_every_group_searched(model_type):
    """AWQ through the descriptors, MoE experts included (each expert's up->down pair on its routed tokens)."""
    m0 = tiny_model(model_type, dtype=torch.float32, num_key_value_heads=4)
    ids = tokens(8, 32)
    ref = _logits(m0, ids)
    errs = {}
    for method in ("rtn", "awq"):
        m = copy.deepcopy(m0)
        res, _ = _run(m, method, ids, bits=3)
        errs[method] = float((_logits(m, ids) - ref).norm() / ref.norm())
    assert errs["awq"] < 0.95 * errs["rtn"]
    assert not res.info["skipped"]                               # MHA here: every descriptor group applies
    if model_type in MOE:
        assert res.info["scales"]["model.layers.0.down"]["experts_searched"] == 4


@pytest.mark.parametrize("model_type", ["phi3", "gemma2", "olmo3", "qwen3_5_text"])
def test_sliderquant_folds_through_the_descriptors(model_type):
    """Learned scales folded into fused rows (phi3), (1 + w) norms (Gemma), OLMo's linear pairs, hybrid layers."""
    m0 = tiny_model(model_type, dtype=torch.float32, num_key_value_heads=4)
    ids = tokens(6, 32)
    ref = _logits(m0, ids)
    m = copy.deepcopy(m0)
    res, _ = _run(m, "sliderquant", ids, bits=8, epochs=2, lr_scale=5e-2, mode="slider")   # scales learned and folded
    # correct folds: 0.006-0.03 here; Gemma's norm folded as w instead of (1 + w): 0.66
    assert float((_logits(m, ids) - ref).norm() / ref.norm()) < 0.05
    assert not res.info["skipped"]
