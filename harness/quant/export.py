"""Quantized checkpoints as normal Hugging Face directories: `fake` (dequantized) or `packed` (compressed-tensors).

Both are written from the same integer codes (QuantResult.layers) and decode through the one
function `decode_weight`, so they hold bit-identical weights:

    w = (codes - zero) * scale        # computed in the model dtype, as compressed-tensors does

- fake: every quantized linear's weight is `decode_weight(...)` in the model dtype; any engine serves it.
- packed: compressed-tensors `pack-quantized` — per quantized linear `weight_packed` (int32, codes
  packed densely), `weight_scale` (model dtype, [out, in/group] or [out, 1] per channel),
  `weight_shape`, and for asymmetric grids `weight_zero_point` (packed along the output dim).
  compressed-tensors stores *signed* codes: code_ct = code - 2^(bits-1) and zero_ct = zero - 2^(bits-1);
  symmetric grids have zero = 2^(bits-1), i.e. zero_ct = 0, and store no zero point. vLLM serves 4/8-bit
  checkpoints of this format with its WNA16 (Marlin) kernels.

config.json records how the checkpoint was made under the key "rqbench" (method, spec, calibration,
rqbench version, ...) — whatever `provenance` the caller passes.

Weight-activation results (QuantResult.activations, e.g. SliderQuant W4A4) are recorded under
"rqbench.input_activations" in both kinds (packed ones also as compressed-tensors `input_activations`:
int, dynamic, per token); saving and loading install the per-token fake-quant hooks
(`harness.quant.actquant`), so the in-memory and the reloaded model compute the same thing.

`load_checkpoint` reads either kind back as a plain dense model; for packed checkpoints it runs
compressed-tensors' own decompression (PackedQuantizationCompressor.decompress) module by module.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from harness.quant import actquant
from harness.types import QuantizedLinear, QuantResult, UserError

EXPORTS = ("fake", "packed")
PROVENANCE_KEY = "rqbench"


# ------------------------------------------------------------------ the one decoding

def _expand(p: torch.Tensor, cols: int) -> torch.Tensor:
    return p.repeat_interleave(cols // p.shape[1], dim=1)


def decode_weight(q: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
    """(codes - zero) * scale in `dtype`: exactly what compressed-tensors' decompression computes."""
    cols = q.codes.shape[1]
    diff = (q.codes.float() - _expand(q.zero.float(), cols)).to(dtype)     # small integers: exact in any dtype
    return diff * _expand(q.scale.to(dtype), cols)


def ct_scheme_args(q: QuantizedLinear) -> dict:
    """compressed-tensors QuantizationArgs (as a dict) for a layer's grid."""
    args = {"num_bits": q.bits, "type": "int", "symmetric": bool(q.sym), "dynamic": False}
    if q.group_size > 0:
        args.update(strategy="group", group_size=q.group_size)
    else:
        args.update(strategy="channel")
    return args


def _check_layer(name: str, q: QuantizedLinear, weight: torch.Tensor) -> None:
    if tuple(q.codes.shape) != tuple(weight.shape):
        raise ValueError(f"{name}: codes {tuple(q.codes.shape)} do not match the weight {tuple(weight.shape)}")
    if int(q.codes.max()) > 2 ** q.bits - 1:
        raise ValueError(f"{name}: codes exceed {q.bits} bits")
    if q.sym and not torch.all(q.zero == 2 ** (q.bits - 1)):
        raise ValueError(f"{name}: a symmetric grid must have zero = 2^(bits-1)")


def _weight_matrix(model: nn.Module, modules: dict, name: str) -> torch.Tensor:
    """The 2-D matrix a QuantResult entry quantized: a Linear's weight, or a fused expert tensor [E, out, in]
    viewed as [E·out, in] (harness/arch.py: ExpertMatrix)."""
    lin = modules.get(name)
    if isinstance(lin, nn.Linear):
        return lin.weight.data
    try:
        p = model.get_parameter(name)
    except AttributeError:
        p = None
    if p is None or p.dim() != 3:
        raise ValueError(f"QuantResult names {name!r}, which is neither a Linear nor an expert tensor of this model")
    return p.data.view(-1, p.shape[-1])


# ------------------------------------------------------------------ packed tensors

def packed_tensors(q: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors pack-quantized tensors of one linear (local names)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    offset = 2 ** (q.bits - 1)
    signed = (q.codes.to(torch.int16) - offset).to(torch.int8)
    out = {
        "weight_packed": pack_to_int32(signed.contiguous(), q.bits),
        "weight_scale": q.scale.to(dtype).contiguous(),
        "weight_shape": torch.tensor(list(q.codes.shape), dtype=torch.int64),
    }
    if not q.sym:
        zp = (q.zero.round().to(torch.int16) - offset).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zp.contiguous(), q.bits, packed_dim=0).contiguous()
    return out


def quantization_config(model: nn.Module, layers: dict[str, QuantizedLinear], activations: dict | None = None) -> dict:
    """compressed-tensors `quantization_config` for config.json (what vLLM reads).

    One spec for all layers: targets ["Linear"] and every other Linear in `ignore` (llm-compressor's
    convention, which vLLM matches against its fused qkv/gate_up layers). Several specs: one config
    group per spec, targeting exact module names.
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    by_spec: dict[tuple, list[str]] = defaultdict(list)
    for name, q in layers.items():
        by_spec[tuple(sorted(ct_scheme_args(q).items()))].append(name)
    all_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ignore = [n for n in all_linears if n not in layers]
    inputs = None
    if activations:
        if set(activations["targets"]) != set(layers):
            raise ValueError("packed export: activation quantization must cover exactly the quantized linears")
        inputs = QuantizationArgs(num_bits=activations["bits"], type="int", symmetric=activations["sym"],
                                  strategy="token", dynamic=True)
    groups = {}
    for i, (key, names) in enumerate(by_spec.items()):
        targets = ["Linear"] if len(by_spec) == 1 else sorted(names)
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=QuantizationArgs(**dict(key)),
                                                  input_activations=inputs)
    cfg = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                             ignore=ignore)
    data = cfg.model_dump(exclude=["quant_method"])
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **data}


# ------------------------------------------------------------------ save

def _jsonable(obj: Any):
    return json.loads(json.dumps(obj, default=str))


@torch.no_grad()
def save_checkpoint(model: nn.Module, tokenizer, result: QuantResult, out_dir, export: str = "fake",
                    provenance: dict | None = None) -> Path:
    """Write `model` quantized as `result` says into out_dir (an HF checkpoint directory).

    The in-memory model's quantized weights are set to the decoded codes first, so the model in
    memory is exactly the one written (and the one `load_checkpoint` returns).
    """
    if export not in EXPORTS:
        raise UserError(f"export={export!r} is not allowed; allowed: {', '.join(EXPORTS)}")
    out = Path(out_dir)
    modules = dict(model.named_modules())
    experts = [n for n in result.layers if not isinstance(modules.get(n), nn.Linear)]
    if export == "packed" and experts:
        raise UserError(f"export=packed cannot hold fused 3-D MoE expert tensors ({experts[0]}): compressed-tensors "
                        f"pack-quantized describes nn.Linear weights only; allowed here: export=fake")
    out.mkdir(parents=True, exist_ok=True)
    for name, q in result.layers.items():
        w = _weight_matrix(model, modules, name)
        _check_layer(name, q, w)
        w.copy_(decode_weight(q, w.dtype).to(w.device))
    if result.activations:
        actquant.install_recorded(model, result.activations)

    state_dict = None
    if export == "packed" and result.layers:
        state_dict = {}
        for key, t in model.state_dict().items():
            state_dict[key] = t
        for name, q in result.layers.items():
            dtype = modules[name].weight.dtype
            del state_dict[f"{name}.weight"]
            for local, t in packed_tensors(q, dtype).items():
                state_dict[f"{name}.{local}"] = t
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)

    config = json.loads((out / "config.json").read_text())
    if export == "packed" and result.layers:
        config["quantization_config"] = quantization_config(model, result.layers, result.activations)
    config[PROVENANCE_KEY] = _jsonable({"export": export, **(provenance or {}),
                                        "quantized_layers": len(result.layers),
                                        "input_activations": result.activations})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


# ------------------------------------------------------------------ load

def read_provenance(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text()).get(PROVENANCE_KEY, {})


@torch.no_grad()
def load_checkpoint(path, dtype=None, device="cpu") -> nn.Module:
    """A plain dense model from a fake or packed checkpoint directory.

    Packed checkpoints go through transformers' compressed-tensors integration with dequantize=True,
    i.e. compressed-tensors' own decompression (ModelCompressor.decompress_model); what it leaves on
    the modules (scale/zero-point parameters, a wrapped forward) is then removed, so the result is the
    same architecture with ordinary nn.Linear weights. A checkpoint with quantized input activations gets
    its per-token fake-quant hooks back.
    """
    from transformers import AutoModelForCausalLM
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    qcfg = raw.get("quantization_config")
    kwargs = {} if dtype is None else {"dtype": dtype}
    if not qcfg or qcfg.get("quant_method") != "compressed-tensors":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        model = _load_packed(path, qcfg, kwargs)
    acts = raw.get(PROVENANCE_KEY, {}).get("input_activations")
    if acts:
        actquant.install_recorded(model, acts)
    return model.to(device).eval()


def _load_packed(path: Path, qcfg: dict, kwargs: dict) -> nn.Module:
    if qcfg.get("format") != "pack-quantized":
        raise UserError(f"{path}: compressed-tensors format {qcfg.get('format')!r} is not supported here "
                        f"(rqbench reads pack-quantized)")
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig
    import warnings
    config = AutoConfig.from_pretrained(path)
    # Dynamic input activations are run by our own hooks (load_checkpoint); compressed-tensors is asked to
    # decompress the weights only (with input_activations set it sets up its own activation quantizers).
    config.quantization_config = {**qcfg, "config_groups": {
        k: {**g, "input_activations": None} for k, g in qcfg["config_groups"].items()}}
    with warnings.catch_warnings():     # "the config's quantization_config will be used" — yes, with dequantize=True
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`.*")
        model = AutoModelForCausalLM.from_pretrained(path, config=config,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True), **kwargs)
    _strip_compressed_tensors(model)
    return model


_CT_PARAMS = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "weight_global_scale")
_CT_ATTRS = ("quantization_scheme", "quantization_status", "_original_forward_func", "is_staged",
             "quantization_enabled")


def _strip_compressed_tensors(model: nn.Module) -> None:
    """Undo what compressed-tensors attaches to decompressed modules; the weights stay as they are."""
    for name, mod in model.named_modules():
        if not hasattr(mod, "quantization_scheme"):
            continue
        if not isinstance(getattr(mod, "weight", None), torch.Tensor) or mod.weight.device.type == "meta":
            raise UserError(f"{name}: compressed-tensors did not decompress this module")
        for p in _CT_PARAMS:
            if p in mod._parameters:
                del mod._parameters[p]
            mod._buffers.pop(p, None)
        mod.__dict__.pop("forward", None)          # back to the class's own forward
        for a in _CT_ATTRS:
            mod.__dict__.pop(a, None)
    for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
        if attr in model.__dict__:
            model.__dict__.pop(attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


__all__ = ["save_checkpoint", "load_checkpoint", "decode_weight", "packed_tensors", "quantization_config",
           "read_provenance", "EXPORTS"]
