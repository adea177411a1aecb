"""Dynamic per-token activation fake-quantization: the "A4" of W4A4.

Every token's input vector to a quantized linear is put on its own grid just before the matmul
(dynamic: the range is that token's min/max, computed at run time, nothing is calibrated):

  asym: scale = (max - min) / (2^b - 1), zero = round(-min / scale), x_hat = scale * (clamp(round(x/scale) + zero, 0, 2^b-1) - zero)
  sym:  scale = max|x| / (2^(b-1) - 1),  x_hat = scale * clamp(round(x/scale), -(2^(b-1) - 1), 2^(b-1) - 1)

as OmniQuant's and SliderQuant's per-token quantizer (asymmetric by default). Rounding goes through the
shared straight-through estimator, so methods that train (SliderQuant) see the activation error.

A model quantized this way carries forward pre-hooks on its linears (`install`); checkpoints record the
spec (`ActSpec.to_dict`) and `harness.quant.export.load_checkpoint` installs the hooks again, so a cached
checkpoint behaves as the freshly quantized model did. Only the HF backend runs these hooks: vLLM
loads weights into its own kernels and cannot serve fake activation quantization.

Attention q, k, v (SliderQuant's W4A4, as the authors' models/int_llama_layer.py: QuantMatMul quant_x1/quant_x2 on
query_states, key_states, value_states): each (batch, head, token) vector of head_dim values is fake-quantized on
its own grid — after q_norm/k_norm and RoPE, and for keys/values after the cache update, i.e. on what the
attention matmuls read. A module carrying a `QKVQuant` under ATTN_ATTR gets it; every other one (layers not
quantized, linear-attention layers, which never call the attention interface) is untouched. The model's
attention implementation is switched to `rqbench_qkv+<inner>` (`route_attention`): a transformers
AttentionInterface function that quantizes q, k, v and delegates to the implementation the model had (sdpa,
eager — the model file's own eager function —, the HF backend's GQA sdpa, ...), with the inner one's mask.
Per-token quantization acts on each vector alone, so it commutes with repeat_kv, and keys/values may as well be
quantized on their way into a cache: with a cache (decoding) they are, once each (a pre-hook wraps the cache's
`update` for the module's forward), and the attention function quantizes q only; without one (training, a full
recompute) it quantizes all three — the same values either way. P (the softmax output) is not quantized: the
authors set p_quant_params n_bits=16, which their quantizer returns unchanged (quantize/quantizer.py forward).
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch
import torch.nn as nn

from harness.quant.quantizer import RoundSTE

ATTR = "rqbench_input_quant"          # set on every hooked linear: its ActSpec
CLIPMIN = 1e-5                        # the smallest step (OmniQuant's CLIPMIN): an all-zero token stays zero


@dataclass(frozen=True)
class ActSpec:
    bits: int
    sym: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "strategy": "token", "dynamic": True}

    @classmethod
    def from_dict(cls, d: dict) -> "ActSpec":
        return cls(bits=int(d["bits"]), sym=bool(d.get("sym", False)))


def fake_quantize_tokens(x: torch.Tensor, act: ActSpec, gamma: float = 1.0) -> torch.Tensor:
    """x with each token (last dim) fake-quantized on its own grid; gamma < 1: only the first ceil(gamma*d)
    features are quantized (on the grid of the whole token), the rest pass through — SliderQuant's stage 1."""
    xf = x if x.dtype == torch.float64 else x.float()       # float64 (tests) keeps its precision
    if act.sym:
        qmax = 2 ** (act.bits - 1) - 1
        scale = (xf.abs().amax(-1, keepdim=True) / qmax).clamp(min=CLIPMIN)
        xq = torch.clamp(RoundSTE.apply(xf / scale), -qmax, qmax) * scale
    else:
        qmax = 2 ** act.bits - 1
        lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
        scale = ((hi - lo) / qmax).clamp(min=CLIPMIN)
        zero = torch.round(-lo / scale)
        xq = (torch.clamp(RoundSTE.apply(xf / scale) + zero, 0, qmax) - zero) * scale
    if gamma < 1:
        k = min(x.shape[-1], math.ceil(gamma * x.shape[-1]))
        xq = torch.cat([xq[..., :k], xf[..., k:]], dim=-1)
    return xq.to(x.dtype)


def _hook(module: nn.Module, args):
    return (fake_quantize_tokens(args[0], getattr(module, ATTR)), *args[1:])


def install(model: nn.Module, names: Iterable[str], act: ActSpec) -> None:
    """Fake-quantize the inputs of the named linears on every forward (idempotent)."""
    modules = dict(model.named_modules())
    for name in names:
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"activation quantization names {name!r}, which is not a Linear of this model")
        if getattr(mod, ATTR, None) is None:
            mod.register_forward_pre_hook(_hook)
        setattr(mod, ATTR, act)


def installed(model: nn.Module) -> Optional[ActSpec]:
    """The activation spec a model runs with, or None (weight-only / full precision)."""
    for mod in model.modules():
        act = getattr(mod, ATTR, None)
        if act is not None:
            return act
    return None


# ------------------------------------------------------------------ attention q, k, v

ATTN_ATTR = "rqbench_qkv_quant"       # set on every attention module whose q, k, v are fake-quantized: its QKVQuant
ATTN_PREFIX = "rqbench_qkv+"          # attention implementation "rqbench_qkv+<inner>"


@dataclass
class QKVQuant:
    """What one attention module does to q, k, v. Mutable: SliderQuant sets `gamma` per stage (its intra-layer
    quant rate applies to these quantizers too) and clears `active` while the full-precision teacher runs."""
    act: ActSpec
    gamma: float = 1.0
    active: bool = True
    kv_cached: bool = False     # inside a forward: k and v went into the cache quantized (set by the cache update)


def _attention_functions():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS


def _inner_function(module: nn.Module, inner: str):
    """The attention function `inner` as the module's own modeling file resolves it: "eager" is that file's
    eager_attention_forward, any other name goes through the file's AttentionInterface (local overrides included)."""
    src = sys.modules.get(type(module).__module__)
    if inner == "eager":
        fn = getattr(src, "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__}: its modeling file has no eager_attention_forward to delegate to")
        return fn
    return (getattr(src, "ALL_ATTENTION_FUNCTIONS", None) or _attention_functions())[inner]


def _qkv_attention(inner: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        q = getattr(module, ATTN_ATTR, None)
        if q is not None and q.active:
            query = fake_quantize_tokens(query, q.act, q.gamma)
            if not q.kv_cached:
                key, value = (fake_quantize_tokens(t, q.act, q.gamma) for t in (key, value))
        return _inner_function(module, inner)(module, query, key, value, attention_mask, **kwargs)
    attention.__qualname__ = f"qkv_attention[{inner}]"
    return attention


def inner_attention(impl: Optional[str]) -> Optional[str]:
    """The implementation under a q/k/v wrapper (impl itself when it is not wrapped)."""
    return impl[len(ATTN_PREFIX):] if impl and impl.startswith(ATTN_PREFIX) else impl


def wrapped_attention(inner: str) -> str:
    """The registered name of `inner` behind the q/k/v fake-quant (registered on first use, with inner's mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    inner = inner_attention(inner)
    name = ATTN_PREFIX + inner
    if name not in _attention_functions():
        AttentionInterface.register(name, _qkv_attention(inner))
        if inner in ALL_MASK_ATTENTION_FUNCTIONS:       # none: the inner function builds no mask, nor do we
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def swap_inner(impl: Optional[str], old: str, new: str) -> Optional[str]:
    """impl with its inner attention `old` replaced by `new`, keeping a q/k/v wrapper; None when impl's inner is not
    `old` (the HF backend swaps sdpa for its GQA sdpa on CPU this way, wrapped or not)."""
    if inner_attention(impl) != old:
        return None
    return wrapped_attention(new) if impl.startswith(ATTN_PREFIX) else new


def route_attention(model: nn.Module) -> None:
    """Send the model's attention calls through the q/k/v wrapper (a no-op for modules without a QKVQuant)."""
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if not impl.startswith(ATTN_PREFIX):
        model.set_attn_implementation(wrapped_attention(impl))


_CACHE_PATCH = "_rqbench_qkv_cache"      # (cache, whether it had an instance-level update) during one forward


def _into_cache(module: nn.Module, _args, kwargs):
    """Keys and values are quantized as the cache takes them: every cached position once, not at every step."""
    q = getattr(module, ATTN_ATTR, None)
    if q is None:
        return
    q.kv_cached = False
    cache = kwargs.get("past_key_values")
    if not q.active or cache is None or not callable(getattr(cache, "update", None)):
        return
    update = cache.update

    def quantized_update(key_states, value_states, *a, **kw):
        q.kv_cached = True
        return update(fake_quantize_tokens(key_states, q.act, q.gamma),
                      fake_quantize_tokens(value_states, q.act, q.gamma), *a, **kw)
    own = "update" in getattr(cache, "__dict__", {})
    try:
        cache.update = quantized_update
    except AttributeError:          # a cache that takes no attribute: the attention function quantizes k, v itself
        return
    setattr(module, _CACHE_PATCH, (cache, own, update))


def _out_of_cache(module: nn.Module, _args, _kwargs, _output):
    q = getattr(module, ATTN_ATTR, None)
    if q is not None:
        q.kv_cached = False
    patch = module.__dict__.pop(_CACHE_PATCH, None)
    if patch is not None:
        cache, own, update = patch
        if own:
            cache.update = update
        else:
            del cache.update


def quantize_qkv(module: nn.Module, act: ActSpec, gamma: float = 1.0) -> QKVQuant:
    """Attach a (fresh) QKVQuant to one attention module of a model already routed (`route_attention`)."""
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if impl is None:
        raise ValueError(f"{type(module).__name__} is not an attention module (no config attention implementation)")
    if not impl.startswith(ATTN_PREFIX):
        raise ValueError(f"{type(module).__name__}: attention implementation {impl!r} is not routed through the q/k/v "
                         f"fake-quant (route_attention first; a model that cannot switch its attention cannot have it)")
    if getattr(module, ATTN_ATTR, None) is None:
        module.register_forward_pre_hook(_into_cache, with_kwargs=True)
        module.register_forward_hook(_out_of_cache, with_kwargs=True, always_call=True)
    state = QKVQuant(act, gamma=gamma)
    setattr(module, ATTN_ATTR, state)
    return state


def install_attention(model: nn.Module, names: Iterable[str], act: ActSpec) -> dict[str, QKVQuant]:
    """Fake-quantize q, k, v of the named attention modules on every forward; returns their states (fresh ones)."""
    modules = dict(model.named_modules())
    route_attention(model)
    states = {}
    for name in names:
        if name not in modules:
            raise ValueError(f"q/k/v quantization names {name!r}, which is not a module of this model")
        states[name] = quantize_qkv(modules[name], act)
    return states


def install_recorded(model: nn.Module, record: dict) -> None:
    """install() and install_attention() from a QuantResult.activations / checkpoint record:
    {**ActSpec.to_dict(), "targets": [linears], "attention": {**ActSpec.to_dict(), "targets": [modules]} or absent}
    (records written before q/k/v quantization existed have no "attention": linear inputs only)."""
    install(model, record["targets"], ActSpec.from_dict(record))
    attn = record.get("attention")
    if attn:
        install_attention(model, attn["targets"], ActSpec.from_dict(attn))


def installed_attention(model: nn.Module) -> dict[str, ActSpec]:
    """Attention module name -> the q/k/v spec it runs with."""
    return {n: m.rqbench_qkv_quant.act for n, m in model.named_modules() if getattr(m, ATTN_ATTR, None) is not None}


__all__ = ["ActSpec", "QKVQuant", "fake_quantize_tokens", "install", "install_attention", "install_recorded",
           "installed", "installed_attention", "quantize_qkv", "route_attention", "swap_inner", "wrapped_attention"]
