"""The layer-wise runner: capture, per-layer kwargs, windows, quantized outputs fed forward."""
import copy

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from harness.quant.quantizer import QuantSpec, quantize_weight
from harness.quant.runner import LayerwiseRunner, record_inputs
from harness.toy.tokenizer import build_tokenizer
from harness.toy.train import new_model


@pytest.fixture(scope="module")
def toy():
    return new_model(build_tokenizer(), seed=0).eval()


def _ids(vocab, n=6, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def _final(model, ids):
    """Hidden states after the last decoder layer (before the final norm), by a hook on that layer."""
    out = {}
    h = model.model.layers[-1].register_forward_hook(lambda m, a, o: out.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return out["h"]


def test_unquantized_pass_equals_model_hidden_states(toy):
    ids = _ids(toy.config.vocab_size)
    runner = LayerwiseRunner(toy, ids, "cpu", batch_tokens=2 * ids.shape[1], progress=False)
    outs = runner.run()
    assert len(outs) == 3                                  # 6 rows in batches of 2
    assert torch.allclose(torch.cat(outs), _final(toy, ids), atol=1e-6, rtol=0)


def test_per_layer_kwargs_sliding_window_layers():
    # Mixed full / sliding-window layers get different masks: each layer's own kwargs must be replayed.
    cfg = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, use_sliding_window=True,
                      sliding_window=4, max_window_layers=1,
                      layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    cfg._attn_implementation = "eager"          # explicit mask tensors for every layer type
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    ids = _ids(64, n=2, t=16)
    outs = LayerwiseRunner(model, ids, "cpu", progress=False).run()
    assert torch.allclose(torch.cat(outs), _final(model, ids), atol=1e-5, rtol=0)
    # and the masks really differ (otherwise this test would not test anything)
    r = LayerwiseRunner(model, ids, "cpu", progress=False)
    r.capture()
    m0, m1 = r._kwargs[0][0]["attention_mask"], r._kwargs[1][0]["attention_mask"]
    assert m0 is not None and m1 is not None and not torch.equal(m0, m1)


def test_quantized_window_outputs_feed_the_next_layer(toy):
    ids = _ids(toy.config.vocab_size)
    spec = QuantSpec(bits=3, group_size=32)
    model = copy.deepcopy(toy)
    seen_inputs = []

    def rtn(win):
        x0 = next(win.batches())[0]
        seen_inputs.append(x0.clone())
        for lin in win.linears().values():
            lin.weight.data.copy_(quantize_weight(lin.weight.data, spec)[1])

    outs = LayerwiseRunner(model, ids, "cpu", progress=False).run(rtn)
    # After the walk, `model` is the RTN-quantized model: the runner's outputs are its hidden states,
    # i.e. each layer saw the outputs of the already-quantized layers before it.
    assert torch.allclose(torch.cat(outs), _final(model, ids), atol=1e-5, rtol=0)
    reference = copy.deepcopy(toy)
    assert not torch.allclose(torch.cat(outs), _final(reference, ids), atol=1e-3)
    assert len(seen_inputs) == toy.config.num_hidden_layers


def test_windows_overlapping_and_validation(toy):
    ids = _ids(toy.config.vocab_size, n=2)
    ref = _final(toy, ids)
    visited = []
    windows = [(0, 2), (1, 3), (2, 4)]             # SliderQuant-style size-2 stride-1 windows
    outs = LayerwiseRunner(toy, ids, "cpu", progress=False).run(lambda w: visited.append((w.start, w.stop)), windows)
    assert visited == windows
    assert torch.allclose(torch.cat(outs), ref, atol=1e-6, rtol=0)
    for bad in ([(0, 2), (3, 4)], [(1, 4)], [(0, 4), (0, 2), (2, 4)], [(0, 2), (0, 2), (1, 4)], [(0, 5)]):
        with pytest.raises(ValueError):
            LayerwiseRunner(toy, ids, "cpu", progress=False).run(None, bad)


def test_stages_group_linears_by_shared_input(toy):
    ids = _ids(toy.config.vocab_size, n=2)
    stages = []
    LayerwiseRunner(toy, ids, "cpu", progress=False).run(
        lambda w: stages.append(w.stages(w.linears())) if w.index == 0 else None)
    short = [[n.rsplit(".", 1)[1] for n in s] for s in stages[0]]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_forward_stop_when_cuts_the_layer_short(toy):
    ids = _ids(toy.config.vocab_size, n=2)
    calls = {"q": 0, "down": 0}

    def cb(win):
        if win.index:
            return
        mods = win.linears([r"q_proj$", r"down_proj$"])
        (qn, q), (dn, d) = sorted(mods.items())[1], sorted(mods.items())[0]
        with record_inputs({"q": q, "down": d}, lambda n, x: calls.__setitem__(n, calls[n] + 1)):
            win.forward(stop_when=[q])
    LayerwiseRunner(toy, ids, "cpu", progress=False).run(cb)
    assert calls == {"q": 1, "down": 0}


def test_forward_stop_before_records_inputs_without_computing(toy):
    ids = _ids(toy.config.vocab_size, n=2)
    seen = {"in": 0, "out": 0}

    def cb(win):
        if win.index:
            return
        q = win.linears([r"q_proj$"])
        (q,) = q.values()
        h = q.register_forward_hook(lambda *a: seen.__setitem__("out", seen["out"] + 1))
        with record_inputs({"q": q}, lambda n, x: seen.__setitem__("in", seen["in"] + 1)):
            win.forward(stop_before=[q, q])          # duplicates count once
        h.remove()
        with pytest.raises(ValueError):
            win.forward(collect_outputs=True, stop_before=[q])
    LayerwiseRunner(toy, ids, "cpu", progress=False).run(cb)
    assert seen == {"in": 1, "out": 0}
