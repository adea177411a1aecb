"""Which Linear modules a method quantizes (config: method.include / method.exclude regexes)."""
from __future__ import annotations

import re

import torch.nn as nn

from harness.quant.quantizer import QuantSpec


def quantizable_linears(model: nn.Module, include, exclude=()) -> dict[str, nn.Linear]:
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear)
            and any(p.search(name) for p in inc) and not any(p.search(name) for p in exc)}


def check_spec_fits(model: nn.Module, spec: QuantSpec, include, exclude=()) -> None:
    """Fail early (UserError) when the group size does not divide some quantized layer's input width."""
    for name, lin in quantizable_linears(model, include, exclude).items():
        spec.check_width(name, lin.in_features)


def check_widths(in_features: dict[str, int], spec: QuantSpec) -> None:
    for name, width in in_features.items():
        spec.check_width(name, width)
