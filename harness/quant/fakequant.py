"""Fake-quantized Linear modules for the methods that train through the quantizer (Reasoning-QAT, SliderQuant).

`FakeQuantLinear` keeps a latent full-precision weight and computes its forward with the weight
quantize-dequantized on the shared grid (`harness.quant.quantizer.fake_quantize_ste`): the rounding
has a straight-through gradient, the clamp a zero gradient outside the grid, so the latent weight
learns while the forward is exactly the quantized model. The per-group scale can be learnable
(`learn_scale=True`, LSQ-style: its gradient flows through both w/s and (q - z)·s); the zero-point
stays an integer buffer.

Seeding from a PTQ result (`from_linear(..., q)`): the grid is the PTQ scale/zero and the latent weight
one that rounds to exactly the PTQ codes (the PTQ weight itself, or the pre-PTQ weight projected into
its code's rounding cell), so step 0 of training *is* the PTQ model (same weights, same logits, bit
for bit).

`attach(model, ...)` swaps the selected nn.Linear modules in place; `detach(model, ...)` swaps them
back to plain nn.Linear modules holding the decoded weights and returns the `QuantResult` (codes,
scale, zero) the exporter writes. Without gradients the fake-quantized weight is cached per module
and recomputed only when the latent weight or the scale changes (in-place optimizer steps bump
their version counters), so sampling from a fake-quant model costs no more than from a dense one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.quant.quantizer import QuantSpec, compute_qparams, fake_quantize_ste, quantize_codes
from harness.types import QuantizedLinear, QuantResult

SCALE_MIN = 1e-8
CELL = 0.49       # half-width of a code's rounding cell used for projected latents (< 0.5: no ties)


class FakeQuantLinear(nn.Module):
    """y = x Q(W)ᵀ + b with Q the shared quantizer on a (scale, zero) grid, W trained through an STE."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor,
                 spec: QuantSpec, learn_scale: bool = False, out_dtype: torch.dtype | None = None):
        super().__init__()
        out_f, in_f = weight.shape
        spec.check_width("weight", in_f)
        n_groups = 1 if spec.group_size <= 0 else in_f // spec.group_size
        if tuple(scale.shape) != (out_f, n_groups) or tuple(zero.shape) != (out_f, n_groups):
            raise ValueError(f"grid shape {tuple(scale.shape)}/{tuple(zero.shape)} does not match "
                             f"weight {tuple(weight.shape)} with group_size {spec.group_size}")
        self.in_features, self.out_features = in_f, out_f
        self.spec = spec
        self.out_dtype = out_dtype or weight.dtype       # dtype of the model the weight came from
        # fp32 master copies: QAT updates are far below a bf16 weight's resolution.
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        s = scale.detach().float().clone()
        if learn_scale:
            self.scale = nn.Parameter(s)
        else:
            self.register_buffer("scale", s)
        self.register_buffer("zero", zero.detach().float().clone())
        self._cache: tuple | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, spec: QuantSpec, q: QuantizedLinear | None = None,
                    learn_scale: bool = False, fp_weight: torch.Tensor | None = None) -> "FakeQuantLinear":
        """From a linear and (optionally) its PTQ codes and grid. Without codes the grid is the shared
        quantizer's min/max grid of the linear's own weight (RTN) and the latent weight is that weight.

        With codes, the latent weight must round back to exactly those codes. It is the PTQ weight
        (codes - zero)·scale itself or, given the pre-PTQ weight `fp_weight`, that weight wherever it lies
        inside its PTQ code's rounding cell [(q - z ∓ CELL)·s] (the PTQ kept the nearest code) and the
        cell centre elsewhere. A latent at the centre needs half a step of updates before its code moves;
        the fp weight keeps its distance to the boundary, so close calls can flip early, while codes the
        PTQ deliberately moved (GPTQ's error compensation) start as far from flipping back as possible.
        """
        if q is not None:
            if (q.bits, q.group_size, q.sym) != (spec.bits, spec.group_size, spec.sym):
                raise ValueError(f"codes are w{q.bits}g{q.group_size} sym={q.sym}, spec is "
                                 f"w{spec.bits}g{spec.group_size} sym={spec.sym}")
            scale, zero = q.scale.float(), q.zero.float()
            from harness.quant.quantizer import _expand, dequantize
            codes = q.codes.to(scale.device).float()
            weight = dequantize(codes, scale, zero, spec.group_size)
            if fp_weight is not None:
                s = _expand(scale, codes, spec.group_size)
                z = _expand(zero, codes, spec.group_size)
                lo = torch.where(codes > 0, (codes - z - CELL) * s, torch.full_like(s, -torch.inf))
                hi = torch.where(codes < spec.maxq, (codes - z + CELL) * s, torch.full_like(s, torch.inf))
                fw = fp_weight.float().to(s.device)
                weight = torch.where((fw >= lo) & (fw <= hi), fw, weight)
        else:
            scale, zero = compute_qparams(lin.weight.data, spec)
            weight = lin.weight.data.float()
        dev = lin.weight.device
        return cls(weight.to(dev), lin.bias, scale.to(dev), zero.to(dev), spec, learn_scale, lin.weight.dtype)

    def effective_scale(self) -> torch.Tensor:
        return self.scale.clamp(min=SCALE_MIN) if isinstance(self.scale, nn.Parameter) else self.scale

    def quantized_weight(self) -> torch.Tensor:
        """Q(W) in fp32, differentiable w.r.t. the latent weight (and a learnable scale)."""
        return fake_quantize_ste(self.weight, self.effective_scale(), self.zero, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (self.weight.requires_grad or self.scale.requires_grad):
            self._cache = None
            w = self.quantized_weight()
        else:
            key = (self.weight._version, self.scale._version, self.weight.data_ptr(), x.dtype)
            if self._cache is None or self._cache[0] != key:
                with torch.no_grad():
                    self._cache = (key, self.quantized_weight().to(x.dtype))
            w = self._cache[1]
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quantized(self) -> tuple[QuantizedLinear, torch.Tensor]:
        """Codes on the final grid (scale rounded to the model dtype first, so the stored grid is the one
        the codes are optimal for) and the decoded weight in the model dtype."""
        scale = self.effective_scale().to(self.out_dtype).float()
        codes = quantize_codes(self.weight, scale, self.zero, self.spec)
        q = QuantizedLinear(codes=codes.to(torch.uint8).cpu(), scale=scale.cpu(), zero=self.zero.cpu(),
                            bits=self.spec.bits, group_size=self.spec.group_size, sym=self.spec.sym)
        from harness.quant.export import decode_weight
        return q, decode_weight(q, self.out_dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, w{s.bits}g{s.group_size}"
                f"{' sym' if s.sym else ''}, learn_scale={isinstance(self.scale, nn.Parameter)}")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def attach(model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec,
           codes: dict[str, QuantizedLinear] | None = None, learn_scale: bool = False,
           fp_weights: dict[str, torch.Tensor] | None = None) -> dict[str, FakeQuantLinear]:
    """Replace each named linear by a FakeQuantLinear (seeded from `codes[name]`, and the latent projected
    from `fp_weights[name]`, when given; see FakeQuantLinear.from_linear)."""
    codes, fp_weights = codes or {}, fp_weights or {}
    out = {}
    for name, lin in linears.items():
        fq = FakeQuantLinear.from_linear(lin, spec, codes.get(name), learn_scale, fp_weights.get(name))
        _set_module(model, name, fq)
        out[name] = fq
    return out


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@torch.no_grad()
def detach(model: nn.Module) -> QuantResult:
    """Swap every FakeQuantLinear back to an nn.Linear holding its decoded weight; the codes for the exporter."""
    result = QuantResult()
    for name, fq in fake_quant_modules(model).items():
        q, deq = fq.to_quantized()
        lin = nn.Linear(fq.in_features, fq.out_features, bias=fq.bias is not None,
                        device=fq.weight.device, dtype=fq.out_dtype)
        lin.weight.data.copy_(deq.to(fq.weight.device))
        if fq.bias is not None:
            lin.bias.data.copy_(fq.bias.data)
        lin.weight.requires_grad_(False)
        _set_module(model, name, lin)
        result.layers[name] = q
    return result


__all__ = ["FakeQuantLinear", "attach", "detach", "fake_quant_modules"]
