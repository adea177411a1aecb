"""Architecture descriptors: what the quantization methods need to know about each model family, in one place.

Looked up by ``config.model_type``. A descriptor is data:

- ``layers``: where the decoder layers are (a ModuleList).
- ``norm``: how the family's RMSNorm applies its weight: ``"w"`` (x̂·w) or ``"1+w"`` (Gemma, Qwen3-Next/3.5: x̂·(1+w)).
- ``post_norm``: the norms normalise sub-block *outputs* (OLMo-2/3): nothing feeds q/k/v or the MLP through a
  norm, so only linear→linear folds (v→o, up→down) preserve the function.
- ``folds``: scale groups. A fold divides the output channels of ``prev`` (a norm, a linear, or a row slice of a
  fused linear / expert tensor) by s and multiplies the input columns of ``linears`` (and of the full-precision
  ``extra`` readers, e.g. the MoE router) by s — the model computes the same function. ``inspect`` is the block
  whose output measures the error of the group (AWQ's loss). ``when``: the fold exists in layers that have this
  module (hybrid / mixed dense-MoE stacks); a layer that has it but lacks any other named module is an error,
  never a silent skip.
- ``experts``: fused 3-D expert tensors [E, out, in] (transformers 5 MoE), quantized per expert slice as the
  matrix [E·out, in] (groups run along `in`, so this *is* per-expert quantization). ``keep_fp``: modules that
  are never quantized (routers, the shared-expert gate). The MoE router (`mlp.gate`) is a TopKRouter, not an
  nn.Linear, in transformers 5, but vLLM builds it as a linear layer (GateLinear) that a compressed-tensors
  "Linear" target would reach: the packed export lists every keep_fp module in the checkpoint's `ignore`.
- ``rotation``: residual-stream rotation support (QuaRot R1): norm → its readers, the writers, or None with the
  reason in ``refuse``.
- ``refuse``: method (or feature) → why it cannot apply to this family; checked before the model loads.
- ``attention``: the module of a decoder layer that calls transformers' attention interface with q, k, v (where
  SliderQuant's W4A4 fake-quantizes them); a layer without it (hybrid linear attention) has none.

GPTQ's true-sequential order is not a table: the runner derives it from one forward (linears fed by the same
tensor form a stage, in execution order), which holds for every family here; expert tensors come after the
layer's linears, gate_up before down.

Learned from llm-compressor's per-architecture AWQ mappings and GPTQModel's per-model module lists (layer
path, sequential module groups, MoE expert handling); the structure here is our own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn

from harness.types import UserError


@dataclass(frozen=True)
class Fold:
    name: str                       # qkv | o | gate_up | down (the names method.groups uses)
    prev: str                       # relative to the decoder layer
    linears: tuple[str, ...]        # quantized readers (nn.Linear names or expert tensors)
    inspect: str                    # block whose output measures the group's error
    rows: Optional[str] = None      # prev is fused: "v" (of qkv_proj) | "up" (second half of gate_up)
    extra: tuple[str, ...] = ()     # full-precision readers scaled with the linears (router)
    when: Optional[str] = None      # only in layers that have this module
    per_expert: bool = False        # prev rows / readers are expert tensors: one scale vector per expert

    @property
    def gqa_pair(self) -> bool:
        """v -> o: the scale lives on v's channels (kv heads), o reads them repeated over query heads."""
        return self.name == "o"


@dataclass(frozen=True)
class Rotation:
    norms: tuple[tuple[str, tuple[str, ...]], ...]      # (norm, the linears reading its output)
    writers: tuple[str, ...]                            # linears writing the residual stream


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    folds: tuple[Fold, ...]
    layers: str = "model.layers"
    norm: str = "w"
    post_norm: bool = False
    experts: tuple[str, ...] = ()
    keep_fp: tuple[str, ...] = ()
    hybrid: bool = False
    rotation: Optional[Rotation] = None
    refuse: dict = field(default_factory=dict)
    attention: str = "self_attn"

    @property
    def norm_offset(self) -> float:
        return 1.0 if self.norm == "1+w" else 0.0

    def fold_names(self) -> list[str]:
        return list(dict.fromkeys(f.name for f in self.folds))


# ------------------------------------------------------------------ the families

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_ATTN_FOLDS = (Fold("qkv", "input_layernorm", _QKV, "self_attn", when="self_attn"),
               Fold("o", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", when="self_attn"))
_MLP_FOLDS = (Fold("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp",
                   when="mlp.gate_proj"),
              Fold("down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", when="mlp.up_proj"))
_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_MOE_FOLDS = (Fold("gate_up", "post_attention_layernorm", ("mlp.experts.gate_up_proj",), "mlp",
                   extra=("mlp.gate",), when="mlp.experts"),
              Fold("down", "mlp.experts.gate_up_proj", ("mlp.experts.down_proj",), "mlp.experts", rows="up",
                   when="mlp.experts", per_expert=True))
_DENSE_ROTATION = Rotation(norms=(("input_layernorm", _QKV),
                                  ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
                           writers=("self_attn.o_proj", "mlp.down_proj"))
_NO_ROTATION_POST = "the norms act on sub-block outputs (post-norm): a residual rotation does not commute with them"
_NO_ROTATION_SANDWICH = ("(1 + w) norms on the attention/MLP outputs (sandwich norms) do not commute with a "
                         "residual rotation")
_NO_ROTATION_MOE = "residual rotation of fused expert tensors and the router is not implemented"
_NO_EXPERT_TRAINING = "trains nn.Linear modules only: the fused 3-D expert tensors would stay in full precision"

_MOE_REFUSE = {"reasoning_qat": _NO_EXPERT_TRAINING, "sliderquant": _NO_EXPERT_TRAINING,
               "quantlrm": "fine-tuning signals are computed per nn.Linear: the fused expert tensors have none",
               "rotate": _NO_ROTATION_MOE}

FAMILIES: tuple[Family, ...] = (
    Family("llama-like", ("llama", "mistral", "qwen2", "qwen3", "granite"), _ATTN_FOLDS + _MLP_FOLDS,
           rotation=_DENSE_ROTATION),
    Family("phi3", ("phi3",),
           (Fold("qkv", "input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            Fold("o", "self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", rows="v"),
            Fold("gate_up", "post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
            Fold("down", "mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", rows="up")),
           rotation=Rotation(norms=(("input_layernorm", ("self_attn.qkv_proj",)),
                                    ("post_attention_layernorm", ("mlp.gate_up_proj",))),
                             writers=("self_attn.o_proj", "mlp.down_proj"))),
    Family("gemma", ("gemma2", "gemma3_text"),
           (_ATTN_FOLDS[0], _ATTN_FOLDS[1],
            Fold("gate_up", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            _MLP_FOLDS[1]),
           norm="1+w", refuse={"rotate": _NO_ROTATION_SANDWICH}),
    Family("olmo2/3", ("olmo2", "olmo3"), (_ATTN_FOLDS[1], _MLP_FOLDS[1]), post_norm=True,
           refuse={"rotate": _NO_ROTATION_POST}),
    Family("moe", ("qwen3_moe", "mixtral"), _ATTN_FOLDS + _MOE_FOLDS + _MLP_FOLDS, experts=_EXPERTS,
           keep_fp=("mlp.gate",), refuse=_MOE_REFUSE),
    Family("qwen3.5 hybrid", ("qwen3_5_text", "qwen3_5"),
           (*_ATTN_FOLDS,
            Fold("qkv", "input_layernorm", ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z",
                                            "linear_attn.in_proj_b", "linear_attn.in_proj_a"),
                 "linear_attn", when="linear_attn"),
            *_MLP_FOLDS),
           norm="1+w", hybrid=True,
           refuse={"rotate": "hybrid linear-attention layers (conv + recurrent state) are not rotated"}),
    Family("qwen3-next hybrid MoE", ("qwen3_next",),
           (*_ATTN_FOLDS,
            Fold("qkv", "input_layernorm", ("linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba"),
                 "linear_attn", when="linear_attn"),
            Fold("gate_up", "post_attention_layernorm",
                 ("mlp.experts.gate_up_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), "mlp",
                 extra=("mlp.gate", "mlp.shared_expert_gate"), when="mlp.experts"),
            _MOE_FOLDS[1],
            Fold("down", "mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), "mlp.shared_expert.down_proj",
                 when="mlp.shared_expert"),
            *_MLP_FOLDS),
           norm="1+w", hybrid=True, experts=_EXPERTS, keep_fp=("mlp.gate", "mlp.shared_expert_gate"),
           refuse=_MOE_REFUSE),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported_types() -> list[str]:
    return sorted(_BY_TYPE)


def model_type_of(obj) -> Optional[str]:
    config = getattr(obj, "config", obj)
    return getattr(config, "model_type", None)


def family_of(obj, method: Optional[str] = None) -> Family:
    """The descriptor for a model or config; one-line UserError naming the family, the method and what is supported."""
    kind = model_type_of(obj)
    fam = _BY_TYPE.get(kind)
    if fam is None:
        who = f"method={method}: " if method else ""
        raise UserError(f"{who}model_type {kind!r} has no architecture descriptor (harness/arch.py); "
                        f"supported: {', '.join(supported_types())}")
    return fam


def lookup(obj) -> Optional[Family]:
    return _BY_TYPE.get(model_type_of(obj))


def check_method(fam_or_obj, method: str, *, rotate: bool = False, uses_folds: bool = False) -> Family:
    """Refuse (UserError, one line) a method that cannot apply to this family."""
    fam = fam_or_obj if isinstance(fam_or_obj, Family) else family_of(fam_or_obj, method)
    kind = model_type_of(fam_or_obj) if not isinstance(fam_or_obj, Family) else fam.model_types[0]
    if method in fam.refuse:
        ok = [m for m in ("rtn", "gptq", "awq", "quantlrm", "sliderquant", "reasoning_qat") if m not in fam.refuse]
        raise UserError(f"method={method} cannot apply to model_type {kind!r}: {fam.refuse[method]}; "
                        f"supported for this family: {', '.join(ok)}")
    if rotate and fam.rotation is None:
        why = fam.refuse.get("rotate", "no rotation descriptor")
        rot = sorted(t for f in FAMILIES if f.rotation is not None for t in f.model_types)
        raise UserError(f"method={method} with rotation (method.rotate) cannot apply to model_type {kind!r}: {why}; "
                        f"rotation is supported for: {', '.join(rot)}; set method.rotate=false")
    return fam


# ------------------------------------------------------------------ resolving names in a layer

Target = Union[nn.Module, nn.Parameter]


def resolve(layer: nn.Module, name: str) -> Optional[Target]:
    """A module or a parameter (expert tensor) by relative name; None when absent."""
    try:
        return layer.get_submodule(name)
    except AttributeError:
        pass
    parent, _, attr = name.rpartition(".")
    try:
        mod = layer.get_submodule(parent) if parent else layer
    except AttributeError:
        return None
    p = getattr(mod, attr, None)
    return p if isinstance(p, nn.Parameter) else None


def layer_folds(fam: Family, layer: nn.Module) -> list[Fold]:
    """The family's folds that exist in this layer. A fold whose `when` module is present but any other named
    module is not means the descriptor does not match the model: an error, not a skip."""
    out = []
    for f in fam.folds:
        if f.when is not None and resolve(layer, f.when) is None:
            continue
        names = (f.prev, f.inspect, *f.linears, *f.extra)
        missing = [n for n in names if resolve(layer, n) is None]
        if missing:
            raise ValueError(f"{type(layer).__name__} lacks {missing} named by the {fam.name} descriptor's "
                             f"{f.name!r} fold (harness/arch.py)")
        out.append(f)
    return out


def attention_of(fam: Family, layer: nn.Module) -> Optional[str]:
    """The layer's attention module (relative name), or None for a layer without one (linear attention)."""
    return fam.attention if isinstance(resolve(layer, fam.attention), nn.Module) else None


def fold_rows(fold: Fold, prev: Target, config) -> Optional[slice]:
    """Which output rows of a fused prev the fold scales (None: all)."""
    if fold.rows is None:
        return None
    out = prev.weight.shape[0] if isinstance(prev, nn.Module) else prev.shape[-2]
    if fold.rows == "up":                       # [gate; up] stacked along the output dim, gate first
        return slice(out // 2, out)
    if fold.rows == "v":                        # [q; k; v]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = config.num_key_value_heads * head_dim
        return slice(out - kv, out)
    raise ValueError(f"unknown fused rows {fold.rows!r}")


class ExpertMatrix:
    """A fused expert tensor [E, out, in] seen as the matrix [E·out, in] that is quantized (per expert slice:
    groups run along `in`). `weight` is a view: writing it writes the parameter."""

    def __init__(self, param: nn.Parameter):
        self.param = param
        self.experts, self.rows_per_expert, self.in_features = param.shape
        self.out_features = self.experts * self.rows_per_expert
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        return self.param.data.view(-1, self.in_features)


def as_matrix(t: Target):
    """nn.Linear as is; an expert tensor as an ExpertMatrix."""
    if isinstance(t, nn.Parameter):
        if t.dim() != 3:
            raise ValueError(f"expected a 3-D expert tensor, got shape {tuple(t.shape)}")
        return ExpertMatrix(t)
    return t


# ------------------------------------------------------------------ selection and coverage

def selected_weights(model: nn.Module, include, exclude=(), *, root: Optional[nn.Module] = None,
                     prefix: str = "") -> dict[str, object]:
    """Every weight the method is asked to quantize: nn.Linear modules and expert tensors (as ExpertMatrix),
    by full name, matching include and not exclude; the family's keep_fp linears (routers) never.
    root/prefix: only this sub-module (a decoder layer), named as `prefix.<name>`."""
    import re
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    fam = lookup(model)
    keep = tuple("." + k for k in (fam.keep_fp if fam else ()))
    experts = tuple("." + e for e in (fam.experts if fam else ()))
    root = model if root is None else root

    def full(n: str) -> str:
        return f"{prefix}.{n}" if prefix and n else (prefix or n)
    out: dict[str, object] = {}
    for name, mod in root.named_modules():
        if isinstance(mod, nn.Linear) and not full(name).endswith(keep):
            out[full(name)] = mod
    for name, p in root.named_parameters():
        if full(name).endswith(experts) and p.dim() == 3:
            out[full(name)] = ExpertMatrix(p)
    return {n: m for n, m in out.items()
            if any(p.search(n) for p in inc) and not any(p.search(n) for p in exc)}


def expert_tensors(model: nn.Module) -> list[str]:
    """Full names of the model's fused 3-D expert tensors (quantized or not)."""
    fam = lookup(model)
    ends = tuple("." + e for e in (fam.experts if fam else ()))
    return [n for n, p in model.named_parameters() if ends and n.endswith(ends) and p.dim() == 3]


def kept_fp_modules(model: nn.Module) -> list[str]:
    """Full names of the modules the family keeps in full precision (routers, the shared-expert gate)."""
    fam = lookup(model)
    ends = tuple("." + k for k in (fam.keep_fp if fam else ()))
    return [n for n, m in model.named_modules() if ends and n.endswith(ends)
            and isinstance(getattr(m, "weight", None), torch.Tensor)]


def coverage(model: nn.Module, quantized: set, include, exclude=()) -> dict:
    """How much of the selected weights (by parameter count) a result quantized."""
    sel = selected_weights(model, include, exclude)
    total = sum(m.weight.numel() for m in sel.values())
    done = sum(m.weight.numel() for n, m in sel.items() if n in quantized)
    missing = sorted(n for n in sel if n not in quantized)
    layer_total = sum(p.numel() for n, p in model.named_parameters()
                      if n.startswith(_layers_prefix(model)) and p.dim() >= 2)
    return {"selected_params": total, "quantized_params": done,
            "fraction_selected": done / total if total else 0.0,
            "fraction_layer_weights": done / layer_total if layer_total else 0.0,
            "missing": missing}


def _layers_prefix(model) -> str:
    fam = lookup(model)
    return (fam.layers if fam else "model.layers") + "."


def check_coverage(model: nn.Module, quantized: set, include, exclude, label: str) -> dict:
    """Refuse a W<b> label when a selected weight was left in full precision."""
    cov = coverage(model, quantized, include, exclude)
    if cov["missing"]:
        m = cov["missing"]
        raise UserError(f"{label}: {len(m)} selected weight(s) were left in full precision (e.g. {m[0]}), "
                        f"{cov['fraction_selected']:.1%} of the selected parameters quantized; refusing the label — "
                        f"narrow method.include/exclude or use a method that quantizes them")
    return {k: v for k, v in cov.items() if k != "missing"}


__all__ = ["Fold", "Family", "Rotation", "FAMILIES", "family_of", "lookup", "check_method", "layer_folds",
           "resolve", "fold_rows", "ExpertMatrix", "as_matrix", "selected_weights", "coverage", "check_coverage",
           "supported_types", "expert_tensors", "kept_fp_modules"]
