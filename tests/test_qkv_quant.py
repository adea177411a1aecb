"""Attention q/k/v fake-quantization (SliderQuant W4A4, as the authors' models/int_llama_layer.py): numbers against
a hand-written reference of the authors' formula, cached decoding, P left alone, training hooks."""
import math

import numpy as np
import pytest
import torch

from harness.quant import actquant
from harness.quant.actquant import ActSpec
from tests.tiny_families import tiny_model, tokens


def _ref_quant(x: torch.Tensor, bits: int, gamma: float = 1.0) -> torch.Tensor:
    """The authors' per-token dynamic quantizer (quantize/quantizer.py per_token_dynamic_calibration + fake_quant,
    symmetric False) vector by vector: scale = clamp((max - min) / (2^b - 1), 1e-5), zero = round(-min / scale);
    with a quant rate, the first ceil(rate * d) values are quantized on the whole vector's grid."""
    a = x.detach().double().numpy()
    out = a.copy()
    d = a.shape[-1]
    k = min(d, math.ceil(gamma * d))
    qmax = 2 ** bits - 1
    flat_in, flat_out = a.reshape(-1, d), out.reshape(-1, d)
    for i, t in enumerate(flat_in):
        s = max((t.max() - t.min()) / qmax, 1e-5)
        z = np.round(-t.min() / s)
        flat_out[i, :k] = (np.clip(np.round(t[:k] / s) + z, 0, qmax) - z) * s
    return torch.from_numpy(out).to(x.dtype)


def _rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


def _ref_attention(attn, h, cos, sin, bits, gamma):
    """Attention written out: projections, q/k norms (Qwen3), RoPE, then q, k, v quantized per (b, head, token),
    keys/values repeated over the query heads, causal softmax in full precision, P V, o_proj."""
    b, t, _ = h.shape
    hd = attn.head_dim
    q, k, v = (p(h).view(b, t, -1, hd) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    q, k = _rope(q, cos[:, None], sin[:, None]), _rope(k, cos[:, None], sin[:, None])
    if bits:
        q, k, v = (_ref_quant(x, bits, gamma) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * attn.scaling
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)
    return attn.o_proj((p @ v).transpose(1, 2).reshape(b, t, -1)), p


def _capture(attn):
    """The attention module's input (hidden states, position embeddings) and output (output, weights) of a forward."""
    seen = {}

    def pre(_m, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["pe"] = kwargs["position_embeddings"]

    def post(_m, _a, _k, out):
        seen["out"], seen["weights"] = out[0], out[1]
    return seen, [attn.register_forward_pre_hook(pre, with_kwargs=True),
                  attn.register_forward_hook(post, with_kwargs=True)]


@pytest.mark.parametrize("model_type,inner,gamma", [("qwen3", "eager", 1.0), ("qwen3", "sdpa", 1.0),
                                                    ("llama", "sdpa", 1.0), ("qwen3", "eager", 0.5)])
def test_attention_matches_the_authors_formula(model_type, inner, gamma):
    model = tiny_model(model_type)
    model.set_attn_implementation(inner)
    states = actquant.install_attention(model, ["model.layers.1.self_attn"], ActSpec(4))
    states["model.layers.1.self_attn"].gamma = gamma
    assert model.config._attn_implementation == f"rqbench_qkv+{inner}"
    ids = tokens()
    # with a cache k, v are quantized on their way into it, without one inside the attention function
    for i, bits, cache in ((1, 4, True), (1, 4, False), (0, 0, True)):      # layer 0 carries no spec: untouched
        attn = model.model.layers[i].self_attn
        seen, hooks = _capture(attn)
        with torch.no_grad():
            model(ids, use_cache=cache)
            ref, p = _ref_attention(attn, seen["h"], *seen["pe"], bits, gamma)
        for hk in hooks:
            hk.remove()
        torch.testing.assert_close(seen["out"], ref, rtol=0, atol=1e-6)     # eager: softmax in float32
        if inner == "eager":
            # P is not quantized (the authors' p_quant_params: 16 bits, a no-op): the weights are the full-precision
            # softmax of the quantized scores, with far more than 2^4 distinct values in a row
            torch.testing.assert_close(seen["weights"], p, rtol=0, atol=1e-6)
            assert len(torch.unique(seen["weights"][0, 0, -1])) > 16
    # the quantization matters: without the spec the same model computes something else
    with torch.no_grad():
        quantized = model(ids).logits
        model.model.layers[1].self_attn.rqbench_qkv_quant.active = False
        assert not torch.allclose(model(ids).logits, quantized, atol=1e-4)


def test_cached_greedy_decoding_equals_full_recompute():
    """Keys/values are quantized where the attention reads them (after the cache update): decoding with a cache
    gives the tokens a no-cache recompute of the whole sequence gives, through model.generate and the HF backend
    (which swaps sdpa for its GQA sdpa on CPU, under the wrapper)."""
    from harness.backends.hf import GQA_SDPA, HFBackend, HFBackendConfig
    from harness.toy.tokenizer import build_tokenizer
    from harness.toy.train import new_model
    from harness.types import Sampling
    tok = build_tokenizer()
    model = new_model(tok, seed=1).eval()
    with torch.no_grad():           # larger weights: a random model that does not repeat one token
        for prm in model.parameters():
            if prm.dim() == 2:
                prm.mul_(4)
    names = [f"model.layers.{i}.self_attn" for i in range(len(model.model.layers))]
    actquant.install_attention(model, names, ActSpec(4))
    impl = model.config._attn_implementation
    assert impl == "rqbench_qkv+sdpa"
    assert actquant.swap_inner(impl, "sdpa", GQA_SDPA) == f"rqbench_qkv+{GQA_SDPA}"
    prompts = ["3+4*2=", "12-5+7*3="]
    n_new = 10

    def recompute(prompt):
        ids = tok.encode(prompt, add_special_tokens=False)
        out = []
        with torch.no_grad():
            for _ in range(n_new):
                t = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
                out.append(t)
        return out
    ref = [recompute(p) for p in prompts]
    for p, r in zip(prompts, ref):
        ids = torch.tensor([tok.encode(p, add_special_tokens=False)])
        with torch.no_grad():
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                                 use_cache=True, eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert got[0, ids.shape[1]:].tolist() == r
    backend = HFBackend(HFBackendConfig(batch_size=2), model, tok, torch.device("cpu"), progress=False)
    backend.stop_ids = frozenset()          # the full n_new tokens, whatever the random model says
    seen = set()
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, _a: seen.add(m.config._attn_implementation))
    outs = backend.generate(prompts, Sampling(temperature=0.0, max_new_tokens=n_new))
    hook.remove()
    assert seen == {f"rqbench_qkv+{GQA_SDPA}"}
    for o, r in zip(outs, ref):
        assert o[0].text == tok.decode(r)
    assert model.config._attn_implementation == impl          # the backend's CPU switch was undone
    # and the quantization is really on along the way: without it greedy decoding goes elsewhere
    for m in model.modules():
        if getattr(m, actquant.ATTN_ATTR, None) is not None:
            m.rqbench_qkv_quant.active = False
    assert [recompute(p) for p in prompts] != ref


def test_keys_and_values_enter_the_cache_quantized_once():
    model = tiny_model("qwen3")
    model.set_attn_implementation("sdpa")
    ids = tokens()
    with torch.no_grad():
        plain = model(ids, use_cache=True).past_key_values
        states = actquant.install_attention(model, ["model.layers.1.self_attn"], ActSpec(4))
        cached = model(ids, use_cache=True).past_key_values
    for kind in ("keys", "values"):
        p, c = getattr(plain.layers[1], kind), getattr(cached.layers[1], kind)
        assert torch.equal(c, actquant.fake_quantize_tokens(p, ActSpec(4)))
        assert torch.equal(getattr(cached.layers[0], kind), getattr(plain.layers[0], kind))     # layer 0: no spec
    assert "update" not in vars(cached) and not states["model.layers.1.self_attn"].kv_cached     # hook undone


def test_only_full_attention_layers_of_a_hybrid_model():
    model = tiny_model("qwen3_5_text")
    states = actquant.install_attention(model, ["model.layers.1.self_attn"], ActSpec(4))
    assert list(states) == ["model.layers.1.self_attn"]
    from harness import arch
    fam = arch.family_of(model)
    assert [arch.attention_of(fam, layer) for layer in model.model.layers] == [None, "self_attn"]
    with torch.no_grad():
        model(tokens())
    with pytest.raises(ValueError, match="not an attention module"):
        actquant.install_attention(model, ["model.layers.0.linear_attn"], ActSpec(4))


def test_old_records_without_attention_keep_linear_inputs_only():
    model = tiny_model("qwen3")
    model.set_attn_implementation("sdpa")
    actquant.install_recorded(model, {"bits": 4, "sym": False, "strategy": "token", "dynamic": True,
                                      "targets": ["model.layers.0.mlp.down_proj"]})
    assert actquant.installed(model) == ActSpec(4) and actquant.installed_attention(model) == {}
    assert model.config._attn_implementation == "sdpa"
