"""Deterministic per-sample randomness from integers alone (seed, epoch, sample id, view, ...): every loader,
the synthetic images and the methods that draw per sample (SANE's views, the degraded oracle) derive their random
streams here, so a run resumed at any step draws what the uninterrupted run drew."""
from __future__ import annotations

import torch
from torch import Tensor

_M64 = (1 << 64) - 1
_M32 = 0xFFFFFFFF


def seed_for(*parts: int) -> int:
    """A well-mixed 64-bit seed from integers (seed, epoch, id, view, ...): splitmix64 over the parts, so
    nearby tuples give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _M64
        h ^= h >> 29
    return h



def hash01(ids: Tensor, numel: int, salt: int = 0) -> Tensor:
    """Deterministic uniform [0,1) noise per (id, position): [B] int64 -> float [B, numel], on ids' device."""
    pos = torch.arange(numel, device=ids.device, dtype=torch.int64)
    x = (ids[:, None] * 0x9E3779B1 + pos[None] * 0x45D9F3B + salt) & _M32
    for mult in (0x7FEB352D, 0x6C8E9CF5):  # two multiply-xorshift rounds (lowbias32-style mixing)
        x = ((x ^ (x >> 16)) * mult) & _M32  # constants < 2^31 keep the int64 products exact
    x = x ^ (x >> 15)
    return x.float() * (1.0 / 2**32)
