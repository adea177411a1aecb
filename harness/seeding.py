"""Per-sample seeds and batch-independent random numbers.

Sample j of example e under run seed s always draws the same tokens, whichever batch it lands
in and whether the run was resumed: the noise for each row is a pure function of
(sample seed, decode step, token id), computed with a counter-based hash (SplitMix64).
"""
from __future__ import annotations

import hashlib

import torch

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def sample_seed(run_seed: int, example_id: str, sample_index: int) -> int:
    """A 62-bit seed from (run seed, example id, sample index)."""
    digest = hashlib.sha256(f"{run_seed}\x1f{example_id}\x1f{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2^64, which is exactly SplitMix64's arithmetic.
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def uniform_noise(seeds: torch.Tensor, step: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0,1) noise of shape [len(seeds), vocab], a pure function of (seed, step, token id).

    `step` is one int for every row or a tensor with each row's own step (continuous batching: rows
    that joined the batch at different times are at different steps)."""
    dev = seeds.device
    row = _mix(seeds.to(torch.int64) * _GOLDEN + step)
    z = _mix(row[:, None] + torch.arange(vocab, device=dev, dtype=torch.int64)[None, :] * _GOLDEN)
    top53 = _shr(z, 11).to(torch.float64)
    return ((top53 + 0.5) / float(1 << 53)).to(torch.float32)


def gumbel_noise(seeds: torch.Tensor, step: int | torch.Tensor, vocab: int) -> torch.Tensor:
    u = uniform_noise(seeds, step, vocab).clamp(1e-7, 1 - 1e-7)
    return -torch.log(-torch.log(u))
