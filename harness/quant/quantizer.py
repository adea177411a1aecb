"""The one uniform integer quantizer every method uses, so comparisons are fair by construction.

Grid convention (shared with GPTQ's reference code and compressed-tensors):
  unsigned codes q in [0, 2^b - 1], w_hat = scale * (q - zero).
  asym: scale = (max - min) / (2^b - 1), zero = round(-min / scale), where min <= 0 <= max.
  sym:  scale = max|w| / ((2^b - 1) / 2), zero = 2^(b-1)  (signed codes in [-2^(b-1), 2^(b-1) - 1]).
Group-wise: groups of `group_size` consecutive input columns share a (scale, zero); -1 = one per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.types import QuantizedLinear, UserError

ALLOWED_BITS = range(2, 9)
ALLOWED_GROUP_SIZES = (-1, 32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    clip_ratio: float = 1.0     # shrink the range before computing scales (1.0 = no clipping)

    def __post_init__(self):
        if self.bits not in ALLOWED_BITS:
            raise UserError(f"quant.bits={self.bits!r} is not allowed; allowed: 2..8")
        if self.group_size not in ALLOWED_GROUP_SIZES:
            raise UserError(f"quant.group_size={self.group_size!r} is not allowed; "
                            f"allowed: {', '.join(map(str, ALLOWED_GROUP_SIZES))} (-1 = per channel)")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise UserError(f"quant.clip_ratio={self.clip_ratio!r} is not allowed; allowed: (0, 1]")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def check_width(self, name: str, in_features: int) -> None:
        if self.group_size > 0 and in_features % self.group_size:
            raise UserError(
                f"quant.group_size={self.group_size} does not divide the input width {in_features} of "
                f"{name}; allowed for this model: -1 or a divisor of every quantized layer's input width")


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, g] (a view when possible)."""
    out, inp = w.shape
    g = inp if group_size <= 0 else group_size
    return w.reshape(out, inp // g, g)


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec):
    """Scale and (unsigned) zero from per-group min/max. Ranges always include 0."""
    xmin = torch.clamp(xmin, max=0.0)
    xmax = torch.clamp(xmax, min=0.0)
    if spec.sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = amax / (spec.maxq / 2)
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        scale = (xmax - xmin) / spec.maxq
    # An all-zero group gets scale 1 so 0 / scale stays 0 rather than NaN.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not spec.sym:
        zero = torch.clamp(torch.round(-xmin / scale), 0, spec.maxq)
    return scale, zero


def compute_qparams(w: torch.Tensor, spec: QuantSpec, clip_ratio: float | torch.Tensor | None = None):
    """Per-group (scale, zero), each [out, n_groups], from the weight's own range."""
    wg = _grouped(w.float(), spec.group_size)
    ratio = spec.clip_ratio if clip_ratio is None else clip_ratio
    return qparams_from_range(wg.amin(-1) * ratio, wg.amax(-1) * ratio, spec)


def _expand(p: torch.Tensor, w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, n_groups] -> [out, in] by repeating each group's value over its columns."""
    g = w.shape[1] // p.shape[1]
    return p.repeat_interleave(g, dim=1)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    s, z = _expand(scale, w, spec.group_size), _expand(zero, w, spec.group_size)
    return torch.clamp(torch.round(w.float() / s) + z, 0, spec.maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    s, z = _expand(scale, codes, group_size), _expand(zero, codes, group_size)
    return (codes.float() - z) * s


def fake_quantize(w: torch.Tensor, spec: QuantSpec, scale=None, zero=None) -> torch.Tensor:
    """Quantize-dequantize in one step (float32 result)."""
    if scale is None:
        scale, zero = compute_qparams(w, spec)
    return dequantize(quantize_codes(w, scale, zero, spec), scale, zero, spec.group_size)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, scale=None, zero=None) -> tuple[QuantizedLinear, torch.Tensor]:
    """Codes + grid for the exporter, and the dequantized weight in w's dtype."""
    if scale is None:
        scale, zero = compute_qparams(w, spec)
    codes = quantize_codes(w, scale, zero, spec)
    deq = dequantize(codes, scale, zero, spec.group_size).to(w.dtype)
    q = QuantizedLinear(codes=codes.to(torch.uint8), scale=scale.float(), zero=zero.float(),
                        bits=spec.bits, group_size=spec.group_size, sym=spec.sym)
    return q, deq


class RoundSTE(torch.autograd.Function):
    """round() whose gradient is the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def fake_quantize_ste(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Differentiable fake quantization on a fixed (or learnable) grid, for methods that train."""
    s, z = _expand(scale, w, spec.group_size), _expand(zero, w, spec.group_size)
    q = torch.clamp(RoundSTE.apply(w / s) + z, 0, spec.maxq)
    return (q - z) * s
