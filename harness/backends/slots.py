"""Row surgery on the cache a transformers model builds for itself (continuous batching).

The batch's cache is rectangular: every attention layer holds [rows, heads, width, head_dim] keys
and values, each row right-aligned (its real tokens end at the last column; the columns before its
first token are padding, masked out by the 2-D attention mask). Positions are passed explicitly, so
a row's rotary phases do not depend on its column. Three operations keep that invariant:

- `select_rows`: a finished row leaves at once (the others' caches are kept, not recomputed);
- `set_width`: pad every row on the left (a newcomer's prompt is wider than the batch) or drop
  leading columns that are padding in every row (the long row that held them has left);
- `concat`: newcomers, prefilled in a cache of their own, join the batch.

Linear-attention layers (Qwen3.5 / Qwen3-Next conv and recurrent states) have no sequence axis:
only their rows move. Sliding-window layers keep the last `window - 1` columns of the same
right-aligned layout. A cache made of any other layer type (static, quantized, indexed, or a
model's own cache class) is not spliced: `spliceable` says so and the backend falls back to
decoding whole batches with it.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import (DynamicCache, DynamicLayer, DynamicSlidingWindowLayer,
                                      LinearAttentionAndFullAttentionLayer,
                                      LinearAttentionAndSlidingWindowAttentionLayer, LinearAttentionCacheLayerMixin,
                                      LinearAttentionLayer)

_KNOWN = (DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer, LinearAttentionAndFullAttentionLayer,
          LinearAttentionAndSlidingWindowAttentionLayer)


def spliceable(cache) -> bool:
    return isinstance(cache, DynamicCache) and bool(cache.layers) and all(type(l) in _KNOWN for l in cache.layers)


def _has_kv(layer) -> bool:
    return isinstance(layer, DynamicLayer) and layer.is_initialized and layer.keys.dim() == 4


def _states(layer):
    """(dict, key) of every per-row tensor of a linear-attention layer."""
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        for d in (layer.conv_states, layer.recurrent_states):
            for k, t in d.items():
                if t is not None:
                    yield d, k


def _kv_len(layer, width: int) -> int:
    return min(width, layer.sliding_window - 1) if layer.is_sliding else width


def _fit(t: torch.Tensor, length: int) -> torch.Tensor:
    """Right-align t ([rows, heads, seq, dim]) to `length` columns: drop or zero-pad on the left."""
    s = t.shape[-2]
    if s >= length:
        return t[..., s - length:, :]
    return torch.cat([t.new_zeros(*t.shape[:-2], length - s, t.shape[-1]), t], dim=-2)


def select_rows(cache, idx: torch.Tensor) -> None:
    for layer in cache.layers:
        if _has_kv(layer):
            layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
        for d, k in _states(layer):
            d[k] = d[k].index_select(0, idx)


def set_width(cache, width: int) -> None:
    """Make `width` the batch's sequence length (every row keeps its right-aligned tokens)."""
    for layer in cache.layers:
        if _has_kv(layer):
            n = _kv_len(layer, width)
            if layer.keys.shape[-2] != n:
                layer.keys, layer.values = _fit(layer.keys, n), _fit(layer.values, n)
            if layer.is_sliding:
                layer.cumulative_length = width


def concat(cache, other) -> None:
    """Append other's rows to cache (both already at the same width)."""
    for layer, new in zip(cache.layers, other.layers, strict=True):
        if _has_kv(layer):
            layer.keys = torch.cat([layer.keys, new.keys], dim=0)
            layer.values = torch.cat([layer.values, new.values], dim=0)
        for d, k in _states(layer):
            src = new.conv_states if d is layer.conv_states else new.recurrent_states
            d[k] = torch.cat([d[k], src[k]], dim=0)
