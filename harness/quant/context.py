"""What a method receives (QuantContext) and the config every method's schema extends."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from harness.quant.quantizer import QuantSpec


@dataclass
class MethodConfig:
    name: str = "???"
    # Regexes over module names (e.g. "model.layers.0.mlp.down_proj"); default: every Linear in the decoder layers.
    include: list = field(default_factory=lambda: [r"^model\.layers\.\d+\..*"])
    exclude: list = field(default_factory=list)


@dataclass
class QuantContext:
    spec: QuantSpec
    method_cfg: Any                                  # the method's validated Config instance
    tokenizer: Any = None
    calib: Optional[Callable[[], torch.Tensor]] = None   # lazily builds token ids [n_samples, seq_len]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_path: Optional[Path] = None                # HF checkpoint dir of the model being quantized
    cache_dir: Optional[Path] = None                 # for method-side caches (signals, traces)
    progress: bool = True

    def calibration_ids(self) -> torch.Tensor:
        if self.calib is None:
            raise ValueError(f"method {self.method_cfg.name!r} needs calibration data but no calib source is set")
        return self.calib()
