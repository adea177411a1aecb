"""Round-to-nearest: each weight group quantized on its own min/max grid, no calibration.

Every selected weight: nn.Linear modules and fused MoE expert tensors (per expert slice, see harness/arch.py);
routers stay in full precision."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from harness.quant.context import MethodConfig, QuantContext
from harness.quant.quantizer import quantize_weight
from harness import arch
from harness.registry import register_method
from harness.types import QuantResult


@dataclass
class RTNConfig(MethodConfig):
    pass


@register_method("rtn")
class RTN:
    Config = RTNConfig
    quantizes = True

    def __init__(self, cfg: RTNConfig):
        self.cfg = cfg

    @torch.no_grad()
    def quantize(self, model, ctx: QuantContext) -> QuantResult:
        arch.check_method(model, "rtn")
        result = QuantResult()
        weights = arch.selected_weights(model, self.cfg.include, self.cfg.exclude)
        for name, lin in tqdm(weights.items(), desc="rtn", unit="weight", disable=not ctx.progress):
            q, deq = quantize_weight(lin.weight.data, ctx.spec)
            lin.weight.data.copy_(deq)
            result.layers[name] = q
        return result
