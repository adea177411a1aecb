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
"""
from __future__ import annotations

import math
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
    xf = x.float()
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


def install_recorded(model: nn.Module, record: dict) -> None:
    """install() from a QuantResult.activations / checkpoint record ({**ActSpec.to_dict(), "targets": [...]})."""
    install(model, record["targets"], ActSpec.from_dict(record))


def installed(model: nn.Module) -> Optional[ActSpec]:
    """The activation spec a model runs with, or None (weight-only / full precision)."""
    for mod in model.modules():
        act = getattr(mod, ATTR, None)
        if act is not None:
            return act
    return None


__all__ = ["ActSpec", "fake_quantize_tokens", "install", "install_recorded", "installed"]
