"""export=packed for MoE models: the fused expert tensors are written as the per-expert compressed-tensors linears
vLLM's fused-MoE loader reads, and `load_checkpoint` gives back exactly the fake-quantized model."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from harness import arch, registry
from harness.quant.context import QuantContext
from harness.quant.export import load_checkpoint, save_checkpoint
from harness.quant.quantizer import QuantSpec
from harness.types import UserError
from tests.tiny_families import tiny_model, tokens

SPECS = [QuantSpec(4, 32, False), QuantSpec(4, 32, True), QuantSpec(8, -1, True)]

# The checkpoint names vLLM 0.32 loads experts and routers from (read in its source, not run here):
# - models/qwen3_moe.py: Qwen3MoeSparseMoeBlock builds `{prefix}.gate` (GateLinear, *with* the quant config) and
#   `{prefix}.experts` (FusedMoE, checkpoint names gate_proj / up_proj / down_proj) under `model.layers.L.mlp`.
# - models/mixtral.py: MixtralDecoderLayer.block_sparse_moe, `{prefix}.gate` (GateLinear) and `{prefix}.experts`
#   with ckpt_names=("w1", "w2", "w3").
# - layers/fused_moe/routed_experts.py build_expert_params_mapping: checkpoint `experts.<e>.<name>.` -> the layer's
#   w13_ (gate = shard w1, up = shard w3) or w2_ (down) parameter + the suffix (weight_packed, weight_scale,
#   weight_zero_point, weight_shape); compressed_tensors_moe.py get_moe_method looks the scheme up under
#   `<experts prefix>.0.<gate|up|down name>`.
VLLM_MOE = {
    "qwen3_moe": {"block": "mlp", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "mixtral": {"block": "block_sparse_moe", "gate": "w1", "up": "w3", "down": "w2"},
}


def _rtn(model, spec, include=(r"^model\.layers\.\d+\..*",), exclude=()):
    cls = registry.get("method", "rtn")
    cfg = cls.Config(name="rtn", include=list(include), exclude=list(exclude))
    return cls(cfg).quantize(model, QuantContext(spec=spec, method_cfg=cfg, calib=lambda: None, progress=False)), cfg


def _export(tmp_path, model_type, spec, dtype=torch.float32, **rtn):
    m = tiny_model(model_type, dtype=dtype)
    res, cfg = _rtn(m, spec, **rtn)
    save_checkpoint(m, None, res, tmp_path / "fake", "fake")
    save_checkpoint(m, None, res, tmp_path / "packed", "packed")
    return m, res, cfg


# qwen3_next: symmetric only here — its tiny in_proj_ba has 8 output rows, one packed zero-point row, which
# compressed-tensors 0.20's unpack_from_int32 cannot view (a [1, n] tensor transposed); real widths are fine.
@pytest.mark.parametrize("model_type,spec,dtype", [
    *[(t, s, d) for t in ("qwen3_moe", "mixtral")
      for s, d in ((SPECS[0], torch.float32), (SPECS[1], torch.bfloat16), (SPECS[2], torch.float32))],
    ("qwen3_next", SPECS[1], torch.float32)])
def test_packed_moe_loads_back_as_the_fake_quantized_model(tmp_path, model_type, spec, dtype):
    m, res, cfg = _export(tmp_path, model_type, spec, dtype)
    assert arch.check_coverage(m, set(res.layers), cfg.include, cfg.exclude, "rtn")["fraction_selected"] == 1.0
    fake, packed = load_checkpoint(tmp_path / "fake"), load_checkpoint(tmp_path / "packed")
    sf, sp = fake.state_dict(), packed.state_dict()
    assert sf.keys() == sp.keys() and all(torch.equal(sf[k], sp[k]) for k in sf)
    for name in arch.expert_tensors(m):                 # the fused tensors hold the in-memory fake weights
        assert torch.equal(packed.get_parameter(name), m.get_parameter(name)), name
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(fake(ids).logits, packed(ids).logits)
    assert not hasattr(packed.config, "quantization_config") and "_weight_conversions" not in packed.__dict__


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_expert_keys_and_shapes_are_what_vllm_maps(tmp_path, model_type):
    spec = SPECS[0]
    m, res, _ = _export(tmp_path, model_type, spec)
    names = VLLM_MOE[model_type]
    c = m.config
    E, H = c.num_experts if model_type == "qwen3_moe" else c.num_local_experts, c.hidden_size
    inter = c.moe_intermediate_size if model_type == "qwen3_moe" else c.intermediate_size
    t = load_file(tmp_path / "packed" / "model.safetensors")
    pack = 32 // spec.bits
    expected = {}
    for layer in range(c.num_hidden_layers):
        for e in range(E):
            for proj, (out, inp) in ((names["gate"], (inter, H)), (names["up"], (inter, H)), (names["down"], (H, inter))):
                k = f"model.layers.{layer}.{names['block']}.experts.{e}.{proj}"
                expected[k + ".weight_packed"] = (out, inp // pack)
                expected[k + ".weight_scale"] = (out, inp // spec.group_size)
                expected[k + ".weight_zero_point"] = (out // pack, inp // spec.group_size)
                expected[k + ".weight_shape"] = (2,)
        assert f"model.layers.{layer}.{names['block']}.gate.weight" in t           # the router, full precision
        assert t[f"model.layers.{layer}.{names['block']}.gate.weight"].dtype == torch.float32
    got = {k: tuple(v.shape) for k, v in t.items() if ".experts." in k}
    assert got == expected
    # vLLM's mapping rule (build_expert_params_mapping): every expert key lands in one (param, expert, shard).
    rule = re.compile(rf"^(.*\.experts)\.(\d+)\.({names['gate']}|{names['up']}|{names['down']})\.(weight_\w+)$")
    filled = {}
    for k in got:
        prefix, e, proj, suffix = rule.match(k).groups()
        param = f"{prefix}.{'w2_' if proj == names['down'] else 'w13_'}{suffix}"
        shard = {names["gate"]: "w1", names["up"]: "w3", names["down"]: "w2"}[proj]
        assert (param, int(e), shard) not in filled
        filled[(param, int(e), shard)] = k
    assert len(filled) == c.num_hidden_layers * E * 3 * 4
    # the config: vLLM's scheme lookup for `<experts>.0.<gate>` finds the one "Linear" group, routers ignored
    q = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    [group] = q["config_groups"].values()
    assert group["targets"] == ["Linear"] and q["format"] == "pack-quantized"
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32
    assert group["weights"]["symmetric"] is False and group["weights"]["strategy"] == "group"
    routers = {f"model.layers.{i}.{names['block']}.gate" for i in range(c.num_hidden_layers)}
    assert set(q["ignore"]) == routers | {"lm_head"}
    from compressed_tensors.quantization import QuantizationConfig
    QuantizationConfig.model_validate(q)
    from harness.backends.vllm import packed_problems
    assert packed_problems(tmp_path / "packed") == []
    # size: packed experts + fp rest vs the fp checkpoint of the same model
    fp_bytes = (tmp_path / "fake" / "model.safetensors").stat().st_size
    assert (tmp_path / "packed" / "model.safetensors").stat().st_size < fp_bytes


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "qwen3_next"])
def test_compressed_tensors_decompresses_every_expert_onto_the_fake_weights(tmp_path, model_type):
    """compressed-tensors' own matching (targets / ignore) and ModelCompressor.decompress_model, run on the
    checkpoint as a tree of per-expert nn.Linear modules (the view llm-compressor quantizes): every quantized
    linear decompresses to the fake checkpoint's weight bit-exactly, the routers stay untouched."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    _export(tmp_path, model_type, SPECS[1] if model_type == "qwen3_next" else SPECS[0])
    packed = load_file(tmp_path / "packed" / "model.safetensors")
    fake = load_file(tmp_path / "fake" / "model.safetensors")
    raw = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    qcfg = QuantizationConfig.model_validate(raw)
    qcfg.quantization_status = QuantizationStatus.COMPRESSED
    root, linears = nn.Module(), {}
    for key in fake:
        mod, _, local = key.rpartition(".")
        if local == "weight" and fake[key].dim() == 2 and not mod.endswith("embed_tokens"):
            linears[mod] = nn.Linear(fake[key].shape[1], fake[key].shape[0], bias=False)
            parent = root
            for part in mod.split(".")[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(mod.split(".")[-1], linears[mod])
    apply_quantization_config(root, qcfg, show_progress=False)
    quantized = {n for n, mod in root.named_modules() if hasattr(mod, "quantization_scheme")}
    assert quantized == {n for n in linears if f"{n}.weight_packed" in packed}
    assert not any(n.endswith("gate") for n in quantized) and any(".experts.0." in n for n in quantized)
    for name, mod in linears.items():
        if name in quantized:
            del mod._parameters["weight"]
            for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
                if f"{name}.{k}" in packed:
                    mod._parameters[k] = nn.Parameter(packed[f"{name}.{k}"], requires_grad=False)
        else:
            mod.weight = nn.Parameter(packed[f"{name}.weight"], requires_grad=False)
    ModelCompressor(quantization_config=qcfg).decompress_model(root)
    for name, mod in linears.items():
        assert torch.equal(mod.weight.data, fake[f"{name}.weight"]), name


def test_unquantized_experts_are_ignored_per_expert_and_vllm_problems_found(tmp_path):
    # experts' down_proj left in full precision: the packed checkpoint says so per expert, loads back exactly,
    # and vLLM (one scheme per layer's experts) is told it cannot serve it
    m, res, _ = _export(tmp_path, "qwen3_moe", SPECS[0], exclude=[r"experts\.down_proj$"])
    q = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.experts.3.down_proj" in q["ignore"]
    assert "model.layers.0.mlp.experts.3.gate_proj" not in q["ignore"]
    t = load_file(tmp_path / "packed" / "model.safetensors")
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in t and "model.layers.0.mlp.experts.3.up_proj.weight_packed" in t
    fake, packed = load_checkpoint(tmp_path / "fake"), load_checkpoint(tmp_path / "packed")
    assert all(torch.equal(a, b) for a, b in zip(fake.state_dict().values(), packed.state_dict().values()))
    from harness.backends.vllm import packed_problems
    problems = packed_problems(tmp_path / "packed")
    assert len(problems) == 2               # one per layer
    assert "model.layers.0.mlp.experts: gate_proj, up_proj quantized but down_proj not" in problems[0]


def test_vllm_moe_group_sizes(tmp_path):
    from harness.backends.vllm import PACKED_MOE_GROUP_SIZES, packed_problems
    from harness.quant.quantizer import ALLOWED_GROUP_SIZES
    # every group size rqbench allows is one vLLM's fused-MoE kernels take; widening quant.group_size needs a
    # pre-load refusal for MoE packed exports (harness/pipeline.py check_packed_experts)
    assert set(ALLOWED_GROUP_SIZES) <= set(PACKED_MOE_GROUP_SIZES)
    # a foreign checkpoint with other groups is reported (backend=auto then takes hf)
    w4 = {"weights": {"num_bits": 4, "group_size": 16, "symmetric": True}, "targets": ["Linear"]}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "quantization_config": {
        "quant_method": "compressed-tensors", "config_groups": {"group_0": w4}, "ignore": []}}))
    assert any("groups of 16" in p for p in packed_problems(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "quantization_config": {
        "quant_method": "compressed-tensors", "config_groups": {"group_0": w4}, "ignore": []}}))
    assert packed_problems(tmp_path) == []               # dense: other kernels take it


# ------------------------------------------------------------------ through the pipeline, vLLM stand-in

@pytest.fixture
def fake_vllm(monkeypatch):
    from vllm_standin import StandInVLLM

    class Modules:
        def __setitem__(self, k, v):
            monkeypatch.setitem(sys.modules, k, v)
    stand_in = StandInVLLM()
    stand_in.install(Modules())
    return stand_in


@pytest.fixture
def moe_dir(tmp_path):
    from harness.toy.tokenizer import build_tokenizer
    from tests.tiny_families import tiny_config
    from transformers import AutoModelForCausalLM
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", vocab_size=len(tok)))
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    return tmp_path / "moe"


def _run(*overrides):
    from hydra import compose, initialize_config_dir
    from harness.cli import CONF_DIR, execute
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["progress=false", *overrides])
    return execute(cfg)


def test_vllm_receives_the_packed_moe_checkpoint(fake_vllm, moe_dir, tmp_path):
    args = ["model=hf", f"model.path={moe_dir}", "model.dtype=float32", "model.max_new_tokens_cap=16",
            "backend=vllm", "method=rtn", "export=packed", "quant.group_size=32", "task.limit=2",
            f"results_dir={tmp_path / 'r'}", f"cache_dir={tmp_path / 'c'}"]
    result = _run(*args)
    [engine] = fake_vllm.engines
    ckpt = Path(result["checkpoint"]["checkpoint"])
    assert engine.kwargs["model"] == str(ckpt)
    q = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert q["config_groups"]["group_0"]["targets"] == ["Linear"] and "model.layers.0.mlp.gate" in q["ignore"]
    t = load_file(ckpt / "model.safetensors")
    assert "model.layers.1.mlp.experts.3.down_proj.weight_packed" in t and not any("gate_up_proj" in k for k in t)
    assert result["checkpoint"]["coverage"]["fraction_selected"] == 1.0
    # half the experts' projections quantized: refused before the model loads, nothing built
    with pytest.raises(UserError, match=r"backend=vllm cannot serve export=packed with .*method\.exclude=\['experts"
                                        r"\\\\.down_proj\$'\]: .*model\.layers\.0\.mlp\.experts "
                                        r"\(gate_up_proj vs down_proj\).*export=fake"):
        _run(*args, r"method.exclude=[experts\.down_proj$]", f"cache_dir={tmp_path / 'c2'}")
    assert not (tmp_path / "c2").exists() or not any((tmp_path / "c2").rglob("*.safetensors"))


def test_gptq_experts_with_act_order_pack_and_load_back(tmp_path):
    # act_order with static groups keeps every group contiguous: no g_idx, nothing vLLM's MoE kernels refuse
    cls = registry.get("method", "gptq")
    cfg = cls.Config(name="gptq", act_order=True)
    m = tiny_model("qwen3_moe", dtype=torch.float32)
    ids = tokens(8, 32)
    res = cls(cfg).quantize(m, QuantContext(spec=QuantSpec(4, 32, True), method_cfg=cfg, calib=lambda: ids,
                                            progress=False))
    save_checkpoint(m, None, res, tmp_path / "packed", "packed")
    packed = load_checkpoint(tmp_path / "packed")
    for name in arch.expert_tensors(m):
        assert torch.equal(packed.get_parameter(name), m.get_parameter(name)), name
    q = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert q["config_groups"]["group_0"]["weights"].get("actorder") is None
    assert not any(k.endswith("g_idx") for k in load_file(tmp_path / "packed" / "model.safetensors"))
