"""SliderQuant: the window schedule, training lowers each window's reconstruction error, folding is exact."""
import contextlib
import copy

import pytest
import torch

from harness import registry
from harness.quant.actquant import ActSpec
from harness.quant.context import QuantContext
from harness.quant.quantizer import QuantSpec, dequantize
from harness.quant.runner import LayerwiseRunner, _check_windows
from harness.toy.tokenizer import build_tokenizer
from harness.toy.train import new_model
from harness.types import UserError
from methods.sliderquant import SliderQuant, SliderQuantConfig, _SliderLinear, parse_windows, window_schedule


def test_default_schedule_for_32_layers():
    w = window_schedule(32)
    assert len(w) == 33
    assert w[:4] == [(0, 1), (0, 2), (0, 3), (0, 4)]                  # expanding, anchored at 0
    assert w[4:29] == [(a, a + 2) for a in range(3, 28)]               # size 2, stride 1, from layer 3 to 28
    assert w[29:] == [(28, 32), (29, 32), (30, 32), (31, 32)]          # shrinking, anchored at 31


def test_small_and_ablation_schedules():
    assert window_schedule(4) == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 4), (2, 4), (3, 4)]
    assert window_schedule(6, 0, 0, 2, 1) == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]        # CBQ-like
    assert window_schedule(5, 0, 0, 1, 1) == [(i, i + 1) for i in range(5)]                 # OmniQuant-like
    assert window_schedule(12, 4, 4, 3, 2) == [(0, 1), (0, 2), (0, 3), (0, 4), (3, 6), (5, 8), (7, 9),
                                               (8, 12), (9, 12), (10, 12), (11, 12)]
    for n in range(1, 40):          # every generated schedule is one the runner accepts
        for args in ((4, 4, 2, 1), (2, 3, 3, 2), (0, 0, 1, 1), (1, 0, 4, 4)):
            _check_windows(window_schedule(n, *args), n)


def test_hand_written_schedule_and_validation():
    assert parse_windows("0-3,2-5, 6", 7) == [(0, 4), (2, 6), (6, 7)]
    for bad in ("0-3,5-6", "1-6", "0-2,x", "3-1", "0-3,0-3"):
        with pytest.raises(UserError, match="method.windows"):
            parse_windows(bad, 7)
    for key, val in (("gamma", 0.0), ("stride", 3), ("batch_size", 0), ("scale_groups", ["qkv", "mlp"])):
        with pytest.raises(UserError, match=f"method.{key}"):
            SliderQuant(SliderQuantConfig(name="sliderquant", **{key: val}))


@pytest.fixture(scope="module")
def toy_and_ids():
    tok = build_tokenizer()
    model = new_model(tok, seed=0).eval()
    return model, torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))


class _CheckFold(SliderQuant):
    """Records the trained fake-quant model's output right before folding, to compare with the folded one."""

    def _finalize(self, runner, spec, result):
        with torch.no_grad():
            self.trained_out = runner.model.model(self.ids).last_hidden_state.clone()
        super()._finalize(runner, spec, result)


def test_training_lowers_window_error_and_folding_keeps_the_function(toy_and_ids):
    model, ids = toy_and_ids
    spec = QuantSpec(bits=2, group_size=32)
    # large scale lr so that alpha moves far from 1 and the fold is really exercised
    cfg = SliderQuantConfig(name="sliderquant", windows="0-1,1-3,3", epochs=4, lr_scale=2e-2, lr_lowrank=1e-3,
                            scales=True, batch_size=1)
    m = copy.deepcopy(model)
    method = _CheckFold(cfg)
    method.ids = ids
    res = method.quantize(m, QuantContext(spec=spec, method_cfg=cfg, calib=lambda: ids, progress=False))
    losses = res.info["loss"]
    assert [(e["stage"], e["window"]) for e in losses] == [(s, w) for s in (0, 1) for w in ("0-1", "1-3", "3-3")]
    for e in losses:
        assert e["final"] < e["init"], e
    # no wrapper or learnable parameter is left; the model holds exactly the decoded codes
    assert not any(isinstance(mod, _SliderLinear) for mod in m.modules())
    assert not any("sliderquant" in n or "lora" in n or "clip" in n for n, _ in m.named_parameters())
    assert len(res.layers) == 7 * model.config.num_hidden_layers
    for name, q in res.layers.items():
        w = m.get_submodule(name).weight
        assert torch.equal(w, dequantize(q.codes, q.scale, q.zero, q.group_size).to(w.dtype))
    alphas_moved = (m.model.layers[0].input_layernorm.weight - model.model.layers[0].input_layernorm.weight).detach()
    assert float(alphas_moved.abs().max()) > 1e-3
    with torch.no_grad():
        folded = m.model(ids).last_hidden_state
        ref = model.model(ids).last_hidden_state
    # folding 1/alpha into norms / v / up is exact up to rounding ties: far below the quantization error
    fold_err = float(((folded - method.trained_out) ** 2).mean())
    quant_err = float(((folded - ref) ** 2).mean())
    assert fold_err < 1e-3 * quant_err


def test_ablations_leave_the_right_parameters_out(toy_and_ids):
    model, ids = toy_and_ids
    spec = QuantSpec(bits=3, group_size=-1)
    cfg = SliderQuantConfig(name="sliderquant", windows="0-3", gamma=1.0, epochs=1, rank=0, scales=False,
                            include=[r"^model\.layers\.[01]\."], exclude=[r"down_proj$"])
    m = copy.deepcopy(model)
    res = SliderQuant(cfg).quantize(m, QuantContext(spec=spec, method_cfg=cfg, calib=lambda: ids[:2], progress=False))
    assert [e["stage"] for e in res.info["loss"]] == [0]             # gamma = 1: one stage
    assert set(res.layers) == {f"model.layers.{i}.{n}" for i in (0, 1) for n in
                               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj")}
    for i in (0, 1, 2, 3):  # no scales: the norms are untouched; layers outside include keep their weights
        assert torch.equal(m.model.layers[i].input_layernorm.weight, model.model.layers[i].input_layernorm.weight)
    assert torch.equal(m.model.layers[2].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(m.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)


def test_runner_accepts_expanding_windows(toy_and_ids):
    model, ids = toy_and_ids
    with torch.no_grad():
        ref = model.model(ids).last_hidden_state
    visited = []
    outs = LayerwiseRunner(model, ids, "cpu", progress=False).run(
        lambda w: visited.append((w.start, w.stop)), [(0, 1), (0, 2), (0, 4), (1, 4), (3, 4)])
    assert visited == [(0, 1), (0, 2), (0, 4), (1, 4), (3, 4)]
    # the runner's outputs stop before the final norm: compare through it
    assert torch.allclose(model.model.norm(torch.cat(outs)), ref, atol=1e-5, rtol=0)


def test_low_rank_term_is_scaled_by_lora_alpha_over_rank():
    """int_linear_lora.py: adapted = W + B A * (lora_alpha / r), lora_alpha 1 by default (1/4 at rank 4)."""
    lin = torch.nn.Linear(128, 8)
    gen = torch.Generator().manual_seed(0)
    for alpha, factor in ((1.0, 0.25), (4.0, 1.0)):
        w = _SliderLinear(lin, QuantSpec(bits=4), SliderQuantConfig(name="sliderquant", rank=4, lora_alpha=alpha), gen)
        with torch.no_grad():
            w.lora_b.normal_()
        expect = lin.weight.float() + factor * (w.lora_b @ w.lora_a)
        assert torch.allclose(w.effective_weight(), expect, atol=1e-6)


def test_registered_with_the_plugin_attributes():
    cls = registry.get("method", "sliderquant")
    assert cls is SliderQuant and cls.quantizes and cls.uses_calibration


def test_defaults_follow_the_authors_config_per_setting():
    from methods.sliderquant import resolve
    cfg = SliderQuantConfig(name="sliderquant")
    w2 = resolve(cfg, QuantSpec(bits=2))                 # W2A16: lora_only (low-rank lr 5e-4 + clipping), 60 epochs
    assert (w2.mode, w2.scales, w2.lr_lowrank, w2.epochs, w2.rotate) == ("lora_only", False, 5e-4, 60, False)
    w4 = resolve(cfg, QuantSpec(bits=4))                 # weight-only: lora_only too ("lora_only is for WXA16")
    assert (w4.mode, w4.scales, w4.lr_lowrank, w4.epochs, w4.rotate) == ("lora_only", False, 5e-4, 20, False)
    w4a4 = resolve(SliderQuantConfig(name="sliderquant", act_bits=4), QuantSpec(bits=4))
    assert (w4a4.mode, w4a4.scales, w4a4.lr_lowrank, w4a4.rotate) == ("slider", True, 1e-4, True)
    old = resolve(SliderQuantConfig(name="sliderquant", mode="slider", lr_lowrank=1e-4), QuantSpec(bits=4))
    assert (old.scales, old.lr_lowrank) == (True, 1e-4)                       # the earlier W4A16 behaviour, by name
    with pytest.raises(UserError, match="method.mode"):
        SliderQuant(SliderQuantConfig(name="sliderquant", mode="smooth"))
    explicit = resolve(SliderQuantConfig(name="sliderquant", scales=True, lr_lowrank=1e-3, rotate=False, act_bits=4),
                       QuantSpec(bits=2))
    assert (explicit.scales, explicit.lr_lowrank, explicit.rotate) == (True, 1e-3, False)
    with pytest.raises(UserError, match=r"method.act_bits=16 .*null \(weight-only\) or 2..8"):
        SliderQuant(SliderQuantConfig(name="sliderquant", act_bits=16))


def test_w4a4_trains_with_quantized_activations_and_round_trips(tmp_path, toy_and_ids):
    """W4A4: the model is rotated, every quantized linear's input is fake-quantized per token after
    quantization, and fake and packed checkpoints reload to exactly the same function."""
    from harness.quant import actquant
    from harness.quant.export import load_checkpoint, save_checkpoint
    model, ids = toy_and_ids
    cfg = SliderQuantConfig(name="sliderquant", act_bits=4, windows="0-1,1-3,3", epochs=2, batch_size=2)
    m = copy.deepcopy(model)
    res = SliderQuant(cfg).quantize(m, QuantContext(spec=QuantSpec(4, 32), method_cfg=cfg, calib=lambda: ids,
                                                     progress=False))
    assert res.info["rotated"] and res.activations["bits"] == 4 and not res.activations["sym"]
    assert sorted(res.activations["targets"]) == sorted(res.layers)
    # q, k, v of every quantized layer's attention too (qkv_quant, the default), asymmetric 4-bit per token
    attn = [f"model.layers.{i}.self_attn" for i in range(4)]
    assert res.activations["attention"] == {"bits": 4, "sym": False, "strategy": "token", "dynamic": True,
                                            "targets": attn}
    assert actquant.installed_attention(m) == {n: actquant.ActSpec(4, False) for n in attn}
    assert all(mod.rqbench_qkv_quant.gamma == 1.0 and mod.rqbench_qkv_quant.active
               for mod in m.modules() if hasattr(mod, "rqbench_qkv_quant"))
    # rotation folded every norm into the linears that read it
    assert torch.equal(m.model.norm.weight, torch.ones_like(m.model.norm.weight))
    tok = build_tokenizer()
    outs = {}
    for export in ("fake", "packed"):
        save_checkpoint(m, tok, res, tmp_path / export, export)
        assert actquant.installed(m) == actquant.ActSpec(4, False)
        with torch.no_grad():
            in_memory = m(ids).logits
            reloaded_model = load_checkpoint(tmp_path / export, dtype=torch.float32)
            assert actquant.installed(reloaded_model) == actquant.ActSpec(4, False)
            assert actquant.installed_attention(reloaded_model) == actquant.installed_attention(m)
            outs[export] = reloaded_model(ids).logits
        assert torch.equal(outs[export], in_memory)
    # the hooks matter: without them the same weights compute something else
    with torch.no_grad():
        plain = copy.deepcopy(m)
        for mod in plain.modules():
            mod._forward_pre_hooks.clear()
        qkv_only = plain(ids).logits
        assert not torch.allclose(qkv_only, outs["fake"], atol=1e-3)
        for mod in plain.modules():         # and so do the q/k/v quantizers
            if hasattr(mod, "rqbench_qkv_quant"):
                mod.rqbench_qkv_quant.active = False
        assert not torch.allclose(plain(ids).logits, qkv_only, atol=1e-3)


def test_w4a4_qkv_quant_off_and_training_hooks(toy_and_ids, monkeypatch):
    """qkv_quant=false: linear inputs only, the attention left as it was. On: the attention quantizers follow the
    stage's gamma while windows train, and are off while the full-precision teacher runs."""
    import methods.sliderquant as sq
    from harness.quant import actquant
    model, ids = toy_and_ids
    base = dict(name="sliderquant", act_bits=4, windows="0-1,1-3,3", epochs=2, batch_size=2)
    outs = {}
    for qkv in (False, True):
        cfg = SliderQuantConfig(**base, qkv_quant=qkv)
        m = copy.deepcopy(model)
        impl = m.config._attn_implementation
        calls, teaching = [], []
        real_fq, real_teacher = actquant.fake_quantize_tokens, sq._teacher

        def spy(x, act, gamma=1.0):
            calls.append((gamma, bool(teaching)))
            return real_fq(x, act, gamma)

        @contextlib.contextmanager
        def teacher(*a):
            with real_teacher(*a):
                teaching.append(1)
                try:
                    yield
                finally:
                    teaching.pop()
        monkeypatch.setattr(actquant, "fake_quantize_tokens", spy)      # the attention function's quantizer only
        monkeypatch.setattr(sq, "_teacher", teacher)
        res = SliderQuant(cfg).quantize(m, QuantContext(spec=QuantSpec(4, 32), method_cfg=cfg, calib=lambda: ids,
                                                         progress=False))
        monkeypatch.undo()
        if qkv:
            assert {g for g, _ in calls} == {0.5, 1.0} and not any(t for _, t in calls)
            assert m.config._attn_implementation == f"rqbench_qkv+{impl}"
        else:
            assert not calls and "attention" not in res.activations and m.config._attn_implementation == impl
            assert actquant.installed_attention(m) == {}
        with torch.no_grad():
            outs[qkv] = m(ids).logits
    assert not torch.allclose(outs[False], outs[True], atol=1e-3)


def test_qkv_quant_values_are_checked():
    with pytest.raises(UserError, match=r"method.qkv_quant=False is not allowed; allowed: true, or false with act_bits"):
        SliderQuant(SliderQuantConfig(name="sliderquant", qkv_quant=False))
    with pytest.raises(UserError, match=r"method.qkv_quant='yes' is not allowed"):
        SliderQuant(SliderQuantConfig(name="sliderquant", act_bits=4, qkv_quant="yes"))
    assert SliderQuant(SliderQuantConfig(name="sliderquant")).qkv_spec is None
    assert SliderQuant(SliderQuantConfig(name="sliderquant", act_bits=4, act_sym=True)).qkv_spec == ActSpec(4, False)


@pytest.mark.parametrize("stop_after", [2, 4])          # mid stage 1; first window of stage 2
def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, toy_and_ids, stop_after):
    from harness.quant.state import TrainingStopped
    model, ids = toy_and_ids
    spec = QuantSpec(bits=2, group_size=32)
    cfg = SliderQuantConfig(name="sliderquant", windows="0-1,1-3,3", epochs=4, batch_size=2, scales=True,
                            lr_scale=1e-2)

    def ctx(cache):
        return QuantContext(spec=spec, method_cfg=cfg, calib=lambda: ids, progress=False, cache_dir=cache)
    reference = SliderQuant(cfg).quantize(copy.deepcopy(model), ctx(tmp_path / "a"))
    with pytest.raises(TrainingStopped):
        SliderQuant(cfg).quantize(copy.deepcopy(model), ctx(tmp_path / "b"), stop_after=stop_after)
    assert len(list((tmp_path / "b" / "sliderquant" / "train").glob("*.pt"))) == 1
    resumed = SliderQuant(cfg).quantize(copy.deepcopy(model), ctx(tmp_path / "b"))
    assert resumed.info["resumed_windows"] == stop_after
    assert resumed.info["loss"] == reference.info["loss"]
    assert set(resumed.layers) == set(reference.layers)
    for name, q in reference.layers.items():
        r = resumed.layers[name]
        assert torch.equal(r.codes, q.codes) and torch.equal(r.scale, q.scale) and torch.equal(r.zero, q.zero), name
    assert not list((tmp_path / "b" / "sliderquant" / "train").glob("*.pt"))     # done: the state is removed


def test_w4a4_hybrid_quantizes_qkv_of_full_attention_layers_only():
    """Qwen3.5: layer 0 is linear attention (no q/k/v matmuls), layer 1 full attention."""
    from tests.tiny_families import tiny_model, tokens
    m = tiny_model("qwen3_5_text", dtype=torch.float32)
    ids = tokens(4, 16)
    cfg = SliderQuantConfig(name="sliderquant", act_bits=4, rotate=False, windows="0-1", epochs=1, batch_size=2)
    res = SliderQuant(cfg).quantize(m, QuantContext(spec=QuantSpec(4, 32), method_cfg=cfg, calib=lambda: ids,
                                                     progress=False))
    assert res.activations["attention"]["targets"] == ["model.layers.1.self_attn"]
    assert not hasattr(m.model.layers[0].linear_attn, "rqbench_qkv_quant")


def test_qkv_quant_run_identity():
    """One computation, one run directory: qkv_quant=true is the default (no hash of its own, weight-only or W4A4);
    qkv_quant=false (linear inputs only) gets its own."""
    from hydra import compose, initialize_config_dir
    from harness.cli import CONF_DIR
    from harness.config import validate
    from harness.pipeline import run_dir, run_settings
    dirs, settings = {}, {}
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for key, over in {"w4": [], "w4 qkv": ["method.qkv_quant=true"], "w4a4": ["method.act_bits=4"],
                          "w4a4 qkv": ["method.act_bits=4", "method.qkv_quant=true"],
                          "w4a4 linear": ["method.act_bits=4", "method.qkv_quant=false"]}.items():
            spec = validate(compose(config_name="config", overrides=["method=sliderquant", "results_dir=/r", *over]))
            dirs[key], settings[key] = run_dir(spec), run_settings(spec)[0]
    assert dirs["w4"] == dirs["w4 qkv"] and dirs["w4a4"] == dirs["w4a4 qkv"]
    assert len({dirs["w4"], dirs["w4a4"], dirs["w4a4 linear"]}) == 3
    assert settings["w4a4 linear"] == {"method.act_bits": 4, "method.qkv_quant": False}
