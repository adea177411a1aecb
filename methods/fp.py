"""Full precision: the reference every quantized model is compared with."""
from __future__ import annotations

from dataclasses import dataclass

from harness.quant.context import MethodConfig
from harness.registry import register_method
from harness.types import QuantResult


@dataclass
class FPConfig(MethodConfig):
    pass


@register_method("fp")
class FullPrecision:
    Config = FPConfig
    quantizes = False           # the pipeline evaluates the original checkpoint, nothing is cached

    def __init__(self, cfg: FPConfig):
        self.cfg = cfg

    def quantize(self, model, ctx) -> QuantResult:
        return QuantResult()
