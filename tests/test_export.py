"""Checkpoint export: fake and packed decode to bit-identical weights; the packed layout is compressed-tensors'."""
import copy
import json

import pytest
import torch

from harness.quant.context import QuantContext
from harness.quant.export import decode_weight, load_checkpoint, read_provenance, save_checkpoint
from harness.quant.quantizer import QuantSpec, quantize_weight
from harness.toy.tokenizer import build_tokenizer
from harness.toy.train import new_model
from harness.types import QuantResult, UserError


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def base(tok):
    return new_model(tok, seed=0).eval()


def _rtn(model, spec, names=None):
    res = QuantResult()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers.") and (names is None or name in names):
            q, deq = quantize_weight(mod.weight.data, spec)
            mod.weight.data.copy_(deq)
            res.layers[name] = q
    return res


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize("spec,dtype", [
    (QuantSpec(4, 128, False), torch.float32), (QuantSpec(4, 128, True), torch.bfloat16),
    (QuantSpec(3, 128, False), torch.bfloat16), (QuantSpec(8, -1, True), torch.float32),
    (QuantSpec(8, -1, False), torch.bfloat16), (QuantSpec(2, 32, False), torch.float32),
    (QuantSpec(5, 64, True), torch.bfloat16)])
def test_packed_round_trip_bit_identical_to_fake(tmp_path, tok, base, spec, dtype):
    model = copy.deepcopy(base).to(dtype)
    res = _rtn(model, spec)
    save_checkpoint(model, tok, res, tmp_path / "fake", "fake", {"method": "rtn"})
    save_checkpoint(model, tok, res, tmp_path / "packed", "packed", {"method": "rtn"})
    fake, packed = load_checkpoint(tmp_path / "fake"), load_checkpoint(tmp_path / "packed")
    assert fake.dtype == packed.dtype == dtype
    assert _same_weights(fake, packed) == []
    assert _same_weights(fake, model) == []              # the in-memory model is what was written
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(packed.get_submodule(name).weight, decode_weight(res.layers[name], dtype))
    assert list(packed.get_submodule(name).state_dict()) == ["weight"]   # a plain Linear again
    if dtype == torch.float32:
        ids = torch.randint(0, len(tok), (2, 10))
        with torch.no_grad():
            assert torch.equal(packed(ids).logits, model(ids).logits)


def test_packed_layout_is_compressed_tensors(tmp_path, tok, base):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file
    model = copy.deepcopy(base)
    spec = QuantSpec(3, 128, False)
    res = _rtn(model, spec)
    save_checkpoint(model, tok, res, tmp_path, "packed", {"method": "rtn", "calib": {"name": "toy"}})
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert qc["ignore"] == ["lm_head"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert (w["num_bits"], w["group_size"], w["strategy"], w["symmetric"], w["type"]) == (3, 128, "group", False, "int")
    assert read_provenance(tmp_path)["method"] == "rtn" and read_provenance(tmp_path)["export"] == "packed"
    t = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    q = res.layers[name]
    assert f"{name}.weight" not in t and t[f"{name}.weight_packed"].dtype == torch.int32
    signed = unpack_from_int32(t[f"{name}.weight_packed"], 3, q.codes.shape)
    assert torch.equal(signed.to(torch.int16), q.codes.to(torch.int16) - 4)        # signed codes: code - 2^(b-1)
    zp = unpack_from_int32(t[f"{name}.weight_zero_point"], 3, q.zero.shape, packed_dim=0)
    assert torch.equal(zp.to(torch.int16), q.zero.to(torch.int16) - 4)
    assert t[f"{name}.weight_scale"].shape == (q.codes.shape[0], q.codes.shape[1] // 128)


def test_symmetric_packed_has_no_zero_point_and_mixed_specs_get_groups(tmp_path, tok, base):
    from safetensors.torch import load_file
    model = copy.deepcopy(base)
    res = _rtn(model, QuantSpec(4, 128, True), names={"model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj"})
    res.layers.update(_rtn(model, QuantSpec(8, -1, False), names={"model.layers.2.self_attn.o_proj"}).layers)
    save_checkpoint(model, tok, res, tmp_path, "packed", {})
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    targets = sorted(t for g in qc["config_groups"].values() for t in g["targets"])
    assert targets == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.2.self_attn.o_proj"]
    t = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight_zero_point" not in t
    assert "model.layers.2.self_attn.o_proj.weight_zero_point" in t
    assert "model.layers.1.mlp.up_proj.weight" in t                  # not quantized: stored dense
    assert _same_weights(load_checkpoint(tmp_path), model) == []


def test_gptq_codes_export_bit_identical(tmp_path, tok, base):
    from harness import registry
    cls = registry.get("method", "gptq")
    cfg = cls.Config(name="gptq")
    model = copy.deepcopy(base)
    ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(1))
    res = cls(cfg).quantize(model, QuantContext(spec=QuantSpec(4, 128), method_cfg=cfg, calib=lambda: ids, progress=False))
    save_checkpoint(model, tok, res, tmp_path / "p", "packed", {})
    save_checkpoint(model, tok, res, tmp_path / "f", "fake", {})
    assert _same_weights(load_checkpoint(tmp_path / "p"), load_checkpoint(tmp_path / "f")) == []


def test_bad_export_and_mismatched_result(tmp_path, tok, base):
    model = copy.deepcopy(base)
    with pytest.raises(UserError, match="export"):
        save_checkpoint(model, tok, QuantResult(), tmp_path, "gguf", {})
    res = _rtn(copy.deepcopy(base), QuantSpec(4, 128))
    res.layers["model.layers.0.mlp.down_proj"] = res.layers["model.layers.0.mlp.up_proj"]     # wrong shape
    with pytest.raises(ValueError, match="do not match"):
        save_checkpoint(model, tok, res, tmp_path, "packed", {})
