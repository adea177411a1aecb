"""Which Linear modules a method quantizes (config: method.include / method.exclude regexes)."""
from __future__ import annotations

import torch.nn as nn

from harness.quant.quantizer import QuantSpec


def quantizable_linears(model: nn.Module, include, exclude=()) -> dict[str, nn.Linear]:
    """The selected nn.Linear modules (the family's full-precision routers never; harness/arch.py).
    `harness.arch.selected_weights` also lists fused MoE expert tensors."""
    from harness import arch
    return {n: m for n, m in arch.selected_weights(model, include, exclude).items() if isinstance(m, nn.Linear)}


def check_spec_fits(model: nn.Module, spec: QuantSpec, include, exclude=()) -> None:
    """Fail early (UserError) when the group size does not divide some quantized layer's input width."""
    for name, lin in quantizable_linears(model, include, exclude).items():
        spec.check_width(name, lin.in_features)


def check_widths(in_features: dict[str, int], spec: QuantSpec) -> None:
    for name, width in in_features.items():
        spec.check_width(name, width)
