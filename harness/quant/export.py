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
- packed MoE: a fused expert tensor is written as the per-expert linears transformers' save_pretrained writes
  for the full-precision model (`mlp.experts.<e>.gate_proj` ..., Mixtral `block_sparse_moe.experts.<e>.w1` ...;
  see harness/quant/ckpt_layout.py), each with the four tensors above cut from the tensor's codes and grid
  (per expert rows: groups run along `in`, so nothing crosses an expert). Those are the names vLLM's fused-MoE
  loader maps into its w13_/w2_ parameters, and with the "Linear" target vLLM's compressed-tensors config also
  reaches its RoutedExperts layers (CompressedTensorsWNA16MoEMethod). Every name in the config (targets, ignore)
  is a checkpoint name; routers and the other keep_fp modules of the family (harness/arch.py) are in `ignore`.

config.json records how the checkpoint was made under the key "rqbench" (method, spec, calibration,
rqbench version, ...) — whatever `provenance` the caller passes.

Weight-activation results (QuantResult.activations, e.g. SliderQuant W4A4) are recorded under
"rqbench.input_activations" in both kinds (packed ones also as compressed-tensors `input_activations`:
int, dynamic, per token); saving and loading install the per-token fake-quant hooks
(`harness.quant.actquant`), so the in-memory and the reloaded model compute the same thing. The record's
"attention" entry (q/k/v of the attention matmuls, SliderQuant's qkv_quant) is written under "rqbench" only (not
into compressed-tensors' quantization_config); loading re-installs it like the linear inputs (a record without
it: linear inputs only).

`load_checkpoint` reads either kind back as a plain dense model; for packed checkpoints it runs
compressed-tensors' own decompression (PackedQuantizationCompressor.decompress) module by module, and for
per-expert packed linears the same decompression, written back into the fused expert tensors.
"""
from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from harness.quant import actquant, ckpt_layout
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


def quantization_config(model: nn.Module, layers: dict[str, QuantizedLinear], activations: dict | None = None,
                        layout: ckpt_layout.Layout | None = None) -> dict:
    """compressed-tensors `quantization_config` for config.json (what vLLM reads).

    One spec for all layers: targets ["Linear"] and every other Linear in `ignore` (llm-compressor's
    convention, which vLLM matches against its fused qkv/gate_up layers and its fused-MoE layers), with the
    family's routers (keep_fp) and the experts of any fused tensor left unquantized. Several specs: one config
    group per spec, targeting exact module names. Names are the checkpoint's (`layout`, default: the model's).
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    if layout is None:
        layout = _layout(model)

    def ckpt(name: str) -> list[str]:
        return list(layout.experts[name]) if name in layout.experts else [layout.names.get(name, name)]
    by_spec: dict[tuple, list[str]] = defaultdict(list)
    for name, q in layers.items():
        by_spec[tuple(sorted(ct_scheme_args(q).items()))].extend(ckpt(name))
    ignore = [c for n in _dense_modules(model) if n not in layers for c in ckpt(n)]
    ignore += [c for n in layout.experts if n not in layers for c in ckpt(n)]
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


def _dense_modules(model: nn.Module) -> list[str]:
    """The modules written as one weight each: every Linear, and the family's keep_fp modules (routers)."""
    from harness import arch
    named = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + arch.kept_fp_modules(model)
    return list(dict.fromkeys(named))


def _layout(model: nn.Module) -> ckpt_layout.Layout:
    from harness import arch
    return ckpt_layout.layout(model, _dense_modules(model), arch.expert_tensors(model))


def _rows(q: QuantizedLinear, rows: slice) -> QuantizedLinear:
    """One expert's linear out of a fused tensor's codes: its rows, with their own scales and zero points."""
    return QuantizedLinear(codes=q.codes[rows], scale=q.scale[rows], zero=q.zero[rows], bits=q.bits,
                           group_size=q.group_size, sym=q.sym)


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
    out.mkdir(parents=True, exist_ok=True)
    for name, q in result.layers.items():
        w = _weight_matrix(model, modules, name)
        _check_layer(name, q, w)
        w.copy_(decode_weight(q, w.dtype).to(w.device))
    if result.activations:
        actquant.install_recorded(model, result.activations)

    state_dict, layout = None, None
    if export == "packed" and result.layers:
        layout = _layout(model)
        state_dict = dict(model.state_dict())
        experts = {}
        for name, q in result.layers.items():
            if name in layout.experts:                  # written per expert, under checkpoint names, below
                del state_dict[name]
                experts[name] = model.get_parameter(name).dtype
                continue
            del state_dict[f"{name}.weight"]
            for local, t in packed_tensors(q, modules[name].weight.dtype).items():
                state_dict[f"{name}.{local}"] = t
        state_dict = ckpt_layout.revert(model, state_dict)     # the names save_pretrained would write
        for name, dtype in experts.items():
            q = result.layers[name]
            for module, rows in layout.experts[name].items():
                for local, t in packed_tensors(_rows(q, rows), dtype).items():
                    state_dict[f"{module}.{local}"] = t
    # packed: state_dict already has the checkpoint's names (reverting twice would rename twice)
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True, save_original_format=state_dict is None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)

    config = json.loads((out / "config.json").read_text())
    if export == "packed" and result.layers:
        config["quantization_config"] = quantization_config(model, result.layers, result.activations, layout)
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
    files = ckpt_layout.checkpoint_files(path)
    moe = ckpt_layout.has_expert_keys(files)
    if moe:     # per-expert linears go around transformers' expert converter (ckpt_layout.fill_experts)
        kwargs = {**kwargs, "key_mapping": {ckpt_layout.EXPERT_KEY: f".{ckpt_layout.SET_ASIDE}.\\1"},
                  "output_loading_info": True}
    with warnings.catch_warnings():     # "the config's quantization_config will be used" — yes, with dequantize=True
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`.*")
        with _quiet_load_report() if moe else nullcontext():
            model = AutoModelForCausalLM.from_pretrained(path, config=config,
                                                         quantization_config=CompressedTensorsConfig(dequantize=True), **kwargs)
    if moe:
        model, info = model
        # the conversions it recorded include the set-aside renaming: a later save must use the default mapping
        model.__dict__.pop("_weight_conversions", None)
        filled = set(ckpt_layout.fill_experts(model, files, qcfg))
        missing = set(info["missing_keys"]) - filled
        unexpected = [k for k in info["unexpected_keys"] if ckpt_layout.SET_ASIDE not in k]
        if missing or unexpected:
            raise UserError(f"{path}: the checkpoint does not match {type(model).__name__}: missing "
                            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    _strip_compressed_tensors(model)
    return model


@contextmanager
def _quiet_load_report():
    """transformers prints every set-aside expert key as UNEXPECTED and the fused tensors as MISSING; both are
    checked here instead."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


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
