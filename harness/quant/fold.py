"""Folding a per-channel scale through a pair of ops: prev's output channels / s, the readers' input columns · s.

The arithmetic behind AWQ, QuantLRM and SliderQuant's scales, for every op kind the architecture descriptors
(harness/arch.py) name: an RMSNorm weight w (x̂·w) or (1 + w) (Gemma, Qwen3-Next: (1 + w') = (1 + w) / s), a
Linear (rows, and bias), a row slice of a fused Linear (phi3's v rows of qkv_proj, up rows of gate_up_proj),
a fused 3-D expert tensor [E, out, in] (per expert: s is [E, n]); readers are Linears, routers (weight
[E, in]) or expert tensors (input = last dim). Done in float32 and cast back.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from harness import arch


def _weight(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else t.weight


@torch.no_grad()
def divide_outputs(prev, s: torch.Tensor, rows: Optional[slice] = None, norm_offset: float = 0.0) -> None:
    """prev's output channels (or the `rows` of a fused one) divided by s."""
    s = s.float()
    if isinstance(prev, nn.Parameter) and prev.dim() == 3:         # expert tensor [E, out, in], s [E, n]
        r = rows or slice(None)
        seg = prev.data[:, r, :]
        prev.data[:, r, :] = (seg.float() / s.to(seg.device)[:, :, None]).to(prev.dtype)
        return
    w = _weight(prev)
    if w is None:
        raise ValueError(f"cannot fold a scale into {type(prev).__name__} (no weight)")
    r = rows or slice(None)
    if w.dim() == 2:                                                # Linear: rows
        if w[r].shape[0] != s.numel():
            raise ValueError(f"cannot fold a scale of {s.numel()} channels into {w[r].shape[0]} output rows")
        w.data[r] = (w.data[r].float() / s.to(w.device)[:, None]).to(w.dtype)
    elif w.dim() == 1 and rows is None:                             # a norm's per-channel weight
        if w.shape != s.shape:
            raise ValueError(f"cannot fold a scale of {s.numel()} channels into a norm of {w.numel()}")
        w.data.copy_(((w.data.float() + norm_offset) / s.to(w.device) - norm_offset).to(w.dtype))
    else:
        raise ValueError(f"cannot fold a scale into {type(prev).__name__} with weight {tuple(w.shape)}")
    b = getattr(prev, "bias", None)
    if isinstance(b, torch.Tensor):
        b.data[r] = (b.data[r].float() / s.to(b.device)).to(b.dtype)


@torch.no_grad()
def multiply_inputs(readers: Iterable, s: torch.Tensor, expand: Optional[torch.Tensor] = None) -> None:
    """Every reader's input columns multiplied by s (s[expand] when the reader sees the channels repeated)."""
    s = s.float()
    for r in readers:
        if isinstance(r, arch.ExpertMatrix):
            r = r.param
        w = _weight(r)
        if isinstance(r, nn.Parameter) and r.dim() == 3 and s.dim() == 2:   # per expert: s [E, in]
            w.data.copy_((w.data.float() * s.to(w.device)[:, None, :]).to(w.dtype))
            continue
        cols = s if expand is None else s[expand.to(s.device)]
        w.data.copy_((w.data.float() * cols.to(w.device)).to(w.dtype))


def apply(layer: nn.Module, fam: arch.Family, fold: arch.Fold, s: torch.Tensor, config,
          expand: Optional[torch.Tensor] = None) -> None:
    """One descriptor fold with scale s: the layer computes the same function (up to rounding)."""
    prev = arch.resolve(layer, fold.prev)
    divide_outputs(prev, s, arch.fold_rows(fold, prev, config), fam.norm_offset)
    multiply_inputs([arch.resolve(layer, n) for n in (*fold.linears, *fold.extra)], s, expand)


def channels(layer: nn.Module, fold: arch.Fold, config) -> tuple:
    """Shape of the fold's scale: (C,) or, per expert, (E, C)."""
    prev = arch.resolve(layer, fold.prev)
    rows = arch.fold_rows(fold, prev, config)
    if isinstance(prev, nn.Parameter) and prev.dim() == 3:
        n = prev.shape[1] if rows is None else len(range(*rows.indices(prev.shape[1])))
        return (prev.shape[0], n)
    w = _weight(prev)
    n = w.shape[0] if rows is None else len(range(*rows.indices(w.shape[0])))
    return (n,)


def gqa_expand(config, v_channels: int, o_in: int, head_dim: Optional[int] = None) -> Optional[torch.Tensor]:
    """Index [o_in] -> v channel when o reads v's channels repeated over the query heads (GQA); None if 1:1."""
    if v_channels == o_in:
        return None
    head_dim = head_dim or getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if v_channels % head_dim or o_in % v_channels:
        raise ValueError(f"cannot map o_proj inputs ({o_in}) to v_proj outputs ({v_channels})")
    kv, rep = v_channels // head_dim, o_in // v_channels
    idx = (torch.arange(kv)[:, None, None] * head_dim + torch.arange(head_dim)[None, None, :]).expand(kv, rep, head_dim)
    return idx.reshape(-1)


__all__ = ["divide_outputs", "multiply_inputs", "apply", "channels", "gqa_expand"]
