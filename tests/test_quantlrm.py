"""QuantLRM: the restricted quadratic, channel importance, the streaming exact median, the signal cache,
pseudo fine-tuning, and the method on the toy (base, fine-tuned) pair."""
import copy
import math

import pytest
import torch

from harness import registry
from harness.calib import calibration_ids
from harness.quant.context import QuantContext
from harness.quant.finetune_signal import (CheckpointWeights, PFTConfig, Signals, UpdateStats, compute_signals,
                                           load_or_compute, module_components, pair_delta, positive_stats,
                                           pseudo_finetuned, quadratic_map)
from harness.quant.quantizer import QuantSpec, dequantize
from harness.toy.build import ensure_toy
from harness.toy.tokenizer import build_tokenizer
from harness.types import UserError
from methods.quantlrm import QuantLRMConfig


# ------------------------------------------------------------------ the restricted quadratic

def test_quadratic_map_hand_values():
    # x_min 0.1, x_mid 0.5, x_max 2.5, R 10: left denominator 0.4, right 2.0
    x = torch.tensor([0.0, 0.1, 0.3, 0.5, 1.5, 2.5, 0.05, 3.0])
    y = quadratic_map(x, 0.1, 0.5, 2.5, ratio=10.0)
    # 0 -> 1 (excluded); ends -> R; (0.5-0.3)/0.4 = 0.5 -> 1 + 9/4; (1.5-0.5)/2 = 0.5 -> 3.25; outside -> clamped to R
    expect = torch.tensor([1.0, 10.0, 3.25, 1.0, 3.25, 10.0, 10.0, 10.0])
    assert torch.allclose(y, expect, atol=1e-6)
    assert torch.allclose(quadratic_map(x, 0.1, 0.5, 2.5, ratio=4.0)[2], torch.tensor(1 + 3 * 0.25))


def test_quadratic_map_is_a_clamped_u():
    x = torch.linspace(1e-3, 5.0, 2001)
    y = quadratic_map(x, 0.2, 1.0, 4.0, ratio=10.0)
    assert float(y.min()) >= 1.0 and float(y.max()) <= 10.0
    left, right = y[x <= 1.0], y[x >= 1.0]
    assert (left[1:] <= left[:-1]).all() and (right[1:] >= right[:-1]).all()      # down, then up
    assert float(y[(x - 1.0).abs().argmin()]) == pytest.approx(1.0, abs=1e-4)
    assert (y[x <= 0.2] == 10.0).all() and (y[x >= 4.0] == 10.0).all()            # both ends clamp at R


# ------------------------------------------------------------------ importance

def _signals_of(mats: dict, **kw) -> Signals:
    return compute_signals(list(mats), lambda n: mats[n], progress=False, **kw)


def test_importance_on_a_hand_made_update():
    # positives {1, 2, 3}: x_min 1, median 2, x_max 3 -> y(1) = y(3) = 10, y(2) = 1, y(0) = 1
    d = torch.tensor([[0.0, 1.0, 2.0],
                      [0.0, 3.0, 0.0]])
    s = _signals_of({"a": d})
    assert (s.stats.x_min, s.stats.x_mid, s.stats.x_max, s.stats.n_pos, s.stats.n_zero) == (1.0, 2.0, 3.0, 3, 3)
    # columns: y means [1, 10, 1]; zero counts [2, 0, 1]
    assert torch.equal(s.importance(["a"], "quadratic"), torch.tensor([1.0, 10.0, 1.0]))
    assert torch.equal(s.importance(["a"], "zeros"), torch.tensor([3.0, 1.0, 2.0]))
    assert torch.equal(s.importance(["a"]), torch.tensor([3.0, 10.0, 2.0]))


def test_stats_are_global_and_groups_can_stack():
    a = torch.tensor([[1.0, 0.0], [2.0, 4.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 5.0], [0.0, 0.0]])
    s = _signals_of({"a": a, "b": b})
    # one fit over both: positives {1, 2, 3, 4, 5} -> x_min 1, median 3, x_max 5
    assert (s.stats.x_min, s.stats.x_mid, s.stats.x_max) == (1.0, 3.0, 5.0)
    ya = quadratic_map(a, 1, 3, 5).mean(0)
    assert torch.allclose(s.importance(["a"]), ya * torch.tensor([1.0, 2.0]))
    # stacked: 5 rows, y mean over all of them, zeros summed
    y_all = torch.cat([quadratic_map(a, 1, 3, 5), quadratic_map(b, 1, 3, 5)]).mean(0)
    assert torch.allclose(s.importance(["a", "b"]), y_all * torch.tensor([3.0, 4.0]))


def test_zero_count_dtype_fp16_counts_underflowing_updates():
    d = torch.tensor([[1e-8, 0.5, 0.0], [2e-8, 1e-7, 0.25]])    # 1e-8, 2e-8 round to 0 in fp16; 1e-7 does not
    stats = UpdateStats(x_min=1e-8, x_mid=0.25, x_max=0.5, n_pos=5, n_zero=1)
    fp32 = module_components(d, stats, 10.0, "fp32")
    fp16 = module_components(d, stats, 10.0, "fp16")
    assert fp32.zeros.tolist() == [0, 0, 1] and fp16.zeros.tolist() == [2, 0, 1]
    assert torch.equal(fp32.ymean, fp16.ymean)          # y always comes from the fp32 update


# ------------------------------------------------------------------ the streaming exact median

def _reference_middle(x: torch.Tensor):
    pos = x[x > 0].double()
    n = pos.numel()
    lo = float(torch.kthvalue(pos, (n + 1) // 2).values)
    hi = float(torch.kthvalue(pos, n // 2 + 1).values)
    return lo, hi, n


@pytest.mark.parametrize("n,ties", [(50_001, False), (50_000, False), (40_000, True), (40_001, True), (2, False)])
def test_streaming_median_is_exact(n, ties):
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, generator=g).pow(4) * torch.randint(0, 2, (n,), generator=g) * 3.0    # ~half zeros
    if ties:                                 # few distinct values, like differences of bf16 weights
        x = x.to(torch.bfloat16).float()
    x[:3] = torch.tensor([1e-41, 1e30, 7e-39])[: min(3, n)]   # subnormals and a huge value keep their order
    if n == 2:
        x = torch.tensor([0.25, 0.75])
    chunks = list(x.split(997))              # many chunks, each far smaller than the data
    st = positive_stats(lambda: iter(chunks))
    lo, hi, npos = _reference_middle(x)
    pos = x[x > 0]
    assert st.n_pos == npos and st.n_zero == int((x == 0).sum())
    assert st.x_min == float(pos.min()) and st.x_max == float(pos.max())
    assert st.mid_lo == lo and st.mid_hi == hi
    assert st.mid_lo == float(torch.median(pos))          # torch.median is the lower median
    if npos % 2:
        assert st.x_mid == float(torch.median(pos))
    else:                                    # the authors' definition: mean of the two middle values
        assert st.x_mid == (lo + hi) / 2
        if not ties:
            assert lo < hi and st.x_mid != float(torch.median(pos))      # the two definitions differ here


def test_compute_signals_streams_over_chunks_of_big_modules():
    g = torch.Generator().manual_seed(0)
    mats = {f"m{i}": (torch.randn(64, 96, generator=g) * 0.01).abs() * (torch.rand(64, 96, generator=g) > 0.3)
            for i in range(3)}
    small = _signals_of(mats, chunk=500)        # every module split into many row chunks
    whole = _signals_of(mats, chunk=1 << 22)
    assert small.stats == whole.stats
    lo, hi, npos = _reference_middle(torch.cat([m.reshape(-1) for m in mats.values()]))
    assert small.stats.n_pos == npos and small.stats.x_mid == (lo + hi) / 2
    for n in mats:
        assert torch.allclose(small.modules[n].ymean, whole.modules[n].ymean)
        assert torch.equal(small.modules[n].zeros, whole.modules[n].zeros)


def test_identical_models_have_no_signal():
    with pytest.raises(UserError, match="identical"):
        _signals_of({"a": torch.zeros(4, 4)})


# ------------------------------------------------------------------ checkpoints and cache

def test_checkpoint_weights_reads_sharded_checkpoints(tmp_path):
    from harness.toy.train import new_model
    model = new_model(build_tokenizer(), seed=0)
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    reader = CheckpointWeights(tmp_path)
    for name, p in model.named_parameters():
        if name in reader:
            assert torch.equal(reader.get(name), p.detach())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    delta = pair_delta(linears, reader)
    assert all(float(delta(n).max()) == 0.0 for n in linears)
    with pytest.raises(UserError, match="no tensor"):
        reader.get("model.layers.99.mlp.up_proj.weight")


def test_signal_cache_is_reused(tmp_path):
    calls = []
    mats = {"a": torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 0.0]])}

    def compute():
        calls.append(1)
        return _signals_of(mats)

    key = {"base": "b", "fine_tuned": "f", "zero_count_dtype": "fp32"}
    s1, path, cached1 = load_or_compute(tmp_path, key, compute)
    s2, path2, cached2 = load_or_compute(tmp_path, key, compute)
    assert (cached1, cached2, len(calls), path) == (False, True, 1, path2)
    assert s2.stats == s1.stats and torch.equal(s2.importance(["a"]), s1.importance(["a"]))
    _, path3, cached3 = load_or_compute(tmp_path, {**key, "zero_count_dtype": "fp16"}, compute)
    assert not cached3 and path3 != path and len(calls) == 2


# ------------------------------------------------------------------ the method on the toy pair

@pytest.fixture(scope="module")
def toy_pair():
    from transformers import AutoModelForCausalLM
    path = ensure_toy("toy")
    ensure_toy("toy-base")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = build_tokenizer()
    ids = calibration_ids({"name": "toy", "n_samples": 8, "seq_len": 64, "seed": 0}, tok)
    return model, tok, ids, path


def _quantize(model, ids, spec, method="quantlrm", cache_dir=None, model_path=None, tok=None, **over):
    cls = registry.get("method", method)
    cfg = cls.Config(name=method, **over)
    m = copy.deepcopy(model)
    ctx = QuantContext(spec=spec, method_cfg=cfg, tokenizer=tok, calib=lambda: ids, cache_dir=cache_dir,
                       model_path=model_path, progress=False)
    res = cls(cfg).quantize(m, ctx)
    with torch.no_grad():
        err = float(((m.model(ids).last_hidden_state - model.model(ids).last_hidden_state) ** 2).mean())
    return m, res, err


def test_quantlrm_on_the_toy_pair(toy_pair, tmp_path):
    model, tok, ids, path = toy_pair
    spec = QuantSpec(bits=3, group_size=128)
    _, _, rtn_err = _quantize(model, ids, spec, method="rtn")
    m, res, err = _quantize(model, ids, spec, cache_dir=tmp_path, model_path=path)   # base: toy's declared toy-base
    info = res.info["quantlrm"]
    assert info["source"] == "pair" and info["base_model"].endswith("toy-base") and not info["signal_cached"]
    assert 0 < info["stats"]["x_min"] < info["stats"]["x_mid"] < info["stats"]["x_max"]
    assert err < rtn_err
    assert len(res.layers) == 7 * model.config.num_hidden_layers
    for name, q in res.layers.items():
        w = m.get_submodule(name).weight
        assert torch.equal(w, dequantize(q.codes, q.scale, q.zero, q.group_size).to(w.dtype))
    # scale search ran on the signal, not on activations: a rerun (another ablation) reuses the cached signal
    _, res2, _ = _quantize(model, ids, spec, cache_dir=tmp_path, model_path=path, importance="zeros", clip=False)
    assert res2.info["quantlrm"]["signal_cached"]
    groups = ("qkv", "o", "gate_up", "down")
    assert set(res2.info["scales"]) == {f"model.layers.{i}.{g}" for i in range(4) for g in groups}
    # the authors' OLMo-3 setting on this model: statistics over o_proj/down_proj only -> another signal
    _, res3, _ = _quantize(model, ids, spec, cache_dir=tmp_path, model_path=path, groups=["o", "down"], clip=False)
    assert not res3.info["quantlrm"]["signal_cached"]
    assert res3.info["quantlrm"]["stats"] != info["stats"]
    assert set(res3.info["scales"]) == {f"model.layers.{i}.{g}" for i in range(4) for g in ("o", "down")}


@pytest.mark.parametrize("group_signal", ["first", "stack"])
def test_search_gets_the_signal_of_the_right_linears(toy_pair, monkeypatch, group_signal):
    import methods.awq as awq
    from methods.quantlrm import QuantLRM
    model, _, ids, path = toy_pair
    seen = []
    real = awq.search_scale
    monkeypatch.setattr(awq, "search_scale", lambda imp, lins, *a, **k: seen.append(imp.clone()) or real(imp, lins, *a, **k))
    cfg = QuantLRMConfig(name="quantlrm", groups=["qkv", "gate_up"], include=[r"^model\.layers\.0\."], clip=False,
                         group_signal=group_signal)
    method = QuantLRM(cfg)
    method.quantize(copy.deepcopy(model), QuantContext(spec=QuantSpec(bits=3), method_cfg=cfg, calib=lambda: ids[:2],
                                                       model_path=path, progress=False))
    p = "model.layers.0."
    qkv = [p + "self_attn.q_proj"] + ([p + "self_attn.k_proj", p + "self_attn.v_proj"] if group_signal == "stack" else [])
    gu = [p + "mlp.gate_proj"] + ([p + "mlp.up_proj"] if group_signal == "stack" else [])
    assert len(seen) == 2
    assert torch.equal(seen[0], method.signals.importance(qkv)) and torch.equal(seen[1], method.signals.importance(gu))
    assert not torch.equal(method.signals.importance(qkv[:1]), method.signals.importance([p + "self_attn.k_proj"]))


def test_activation_ablation_is_awq(toy_pair):
    model, _, ids, _ = toy_pair
    spec = QuantSpec(bits=3, group_size=128)
    a, _, _ = _quantize(model, ids[:2], spec, method="awq", clip=False)
    b, res, _ = _quantize(model, ids[:2], spec, importance="activation", normalize_scales=True, clip=False,
                          gqa_o="skip")     # AWQ skips a GQA v->o pair; QuantLRM searches it per head by default
    assert "stats" not in res.info["quantlrm"]
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_base_model_is_required_without_a_declared_base(toy_pair):
    model, _, ids, _ = toy_pair
    with pytest.raises(UserError, match="method.base_model"):
        _quantize(model, ids[:1], QuantSpec(bits=3), model_path=None)


def test_config_validation():
    cls = registry.get("method", "quantlrm")
    assert cls.quantizes and cls.uses_calibration
    for over, key in [({"importance": "hessian"}, "method.importance"), ({"zero_count_dtype": "bf16"}, "zero_count"),
                      ({"group_signal": "last"}, "group_signal"), ({"ratio": 0.5}, "method.ratio"),
                      ({"groups": ["mlp"]}, "method.groups"),
                      ({"pseudo_finetune": True, "pft": PFTConfig(optimizer="lion")}, "method.pft.optimizer"),
                      ({"pseudo_finetune": True, "pft": PFTConfig(data="local")}, "method.pft.path")]:
        with pytest.raises(UserError, match=key):
            cls(QuantLRMConfig(name="quantlrm", **over))


# ------------------------------------------------------------------ pseudo fine-tuning

def test_pseudo_finetune_restores_the_model_and_measures_updates():
    from harness.toy.train import new_model
    model = new_model(build_tokenizer(), seed=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = PFTConfig(steps=3, batch_size=2, lr=1e-3, warmup=1, trainable=[r"mlp\."])
    with pseudo_finetuned(model, [(row, row) for row in ids], cfg, progress=False) as run:
        up = run.delta("model.layers.0.mlp.up_proj")
        assert float(up.max()) > 0 and (up > 0).float().mean() > 0.5
        assert float(run.delta("model.layers.0.self_attn.q_proj").max()) == 0.0     # not trainable
        assert len(run.losses) == 3 and all(math.isfinite(v) for v in run.losses)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_response_labels_train_on_responses_only():
    from harness.quant.finetune_signal import generation_marker, response_labels, split_documents
    tok = build_tokenizer()
    marker = generation_marker(tok)
    assert tok.convert_ids_to_tokens(marker)[0] == "<|im_start|>" and tok.decode(marker).endswith("assistant\n")

    def doc(q, a):
        p = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        return tok.encode(p, add_special_tokens=False), tok.encode(a, add_special_tokens=False) + [tok.eos_token_id]

    (p1, r1), (p2, r2) = doc("Compute: 1+2", "<think>\n1+2=3\n</think>\n\\boxed{3}"), doc("Compute: 5-1", "\\boxed{4}")
    tail = r1[-4:]                                  # the row starts inside an earlier response: unattributable
    row = tail + p1 + r1 + p2 + r2[:3]              # ... and ends inside the last response
    labels = response_labels(torch.tensor([row]), marker, tok.eos_token_id)[0].tolist()
    expect = [-100] * (len(tail) + len(p1)) + r1 + [-100] * len(p2) + r2[:3]
    assert labels == expect
    assert response_labels(torch.tensor([row]), None, tok.eos_token_id).tolist() == [row]
    # whole documents out of the rows taken as one stream: the leading tail (no known start) is dropped and
    # counted, p1 + r1 and p2 + r2 are whole, the last one is kept up to the cut; the loss is on responses only
    from harness.train.data import DataReport
    report = DataReport()
    from harness.train.data import prompt_prefix
    docs = split_documents(torch.tensor([row + r2[3:] + p1 + r1[:2]]), marker, tok.eos_token_id, report=report,
                           prefix=prompt_prefix(tok))
    assert [(d.tolist(), y.tolist()) for d, y in docs] == [
        (p1 + r1, [-100] * len(p1) + r1), (p2 + r2, [-100] * len(p2) + r2), (p1 + r1[:2], [-100] * len(p1) + r1[:2])]
    assert (report.kept, report.cut, report.dropped_tokens) == (3, 1, len(tail))


def test_pseudo_finetune_runs_from_toy_base_alone(tmp_path):
    from transformers import AutoModelForCausalLM
    path = ensure_toy("toy-base")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = build_tokenizer()
    ids = calibration_ids({"name": "toy", "n_samples": 4, "seq_len": 32, "seed": 0}, tok)
    pft = PFTConfig(data="reasoning", prompts="toy", n_samples=2, seq_len=256, max_new_tokens=48, steps=2,
                    batch_size=2, lr=1e-3, warmup=0)
    spec = QuantSpec(bits=3, group_size=128)
    m, res, _ = _quantize(model, ids, spec, cache_dir=tmp_path, model_path=path, tok=tok, pseudo_finetune=True,
                          pft=pft, groups=["down"], clip=False)
    info = res.info["quantlrm"]
    assert info["source"] == "pseudo_finetune" and info["pft_steps"] == 2
    assert info["pft_data"] == "documents, responses only" and info["pft_examples"] >= 2
    assert 0 < info["pft_loss_tokens"] < 2 * 256          # prompts masked
    assert info["stats"]["n_pos"] > 0 and len(res.layers) == 7 * model.config.num_hidden_layers
    # the traces were generated by toy-base and cached; a rerun reuses the signal without training
    _, res2, _ = _quantize(model, ids, spec, cache_dir=tmp_path, model_path=path, tok=tok, pseudo_finetune=True,
                           pft=pft, groups=["down"], clip=False)
    assert res2.info["quantlrm"]["signal_cached"]
    assert list((tmp_path / "calib" / "traces").glob("*.jsonl"))


@pytest.mark.slow
def test_cli_quantlrm_on_the_toy(cli, tmp_path):
    proc = cli("method=quantlrm", "quant.bits=3", "task.limit=20", f"results_dir={tmp_path}")
    assert "quantlrm" in proc.stdout


def test_checkpoint_key_follows_the_base_models_contents(tmp_path):
    """A cached quantized checkpoint must not be reused once the base it was computed against changed."""
    import shutil

    from harness.toy.build import ensure_toy
    from methods.quantlrm import QuantLRM, QuantLRMConfig
    base = tmp_path / "base"
    shutil.copytree(ensure_toy("toy-base"), base)
    method = QuantLRM(QuantLRMConfig(name="quantlrm", base_model=str(base)))
    before = method.input_fingerprint(None)
    assert before == method.input_fingerprint(None) and before["base_fingerprint"]
    from safetensors.torch import load_file, save_file
    f = next(base.glob("*.safetensors"))
    tensors = load_file(f)
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, f, metadata={"format": "pt"})
    assert method.input_fingerprint(None) != before
    # the toy zoo's declared base, and no base at all for pseudo fine-tuning or activation importance
    assert QuantLRM(QuantLRMConfig(name="quantlrm")).input_fingerprint(ensure_toy("toy"))["base_model"] == "toy-base"
    assert QuantLRM(QuantLRMConfig(name="quantlrm", pseudo_finetune=True)).input_fingerprint(None) is None
