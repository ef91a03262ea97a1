"""Semantic pair sampling on the data side (SePP pair mode, METHODS.md §4.2).

With a partner table nbr [N, k] (-1 padded), view 0 (the key view) of sample i is drawn from a semantic
partner of i with probability rho, else from i itself. Draws are a hash of (seed, epoch, id): the same on
every rank, for any worker count, and again after a resume.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcl.rand import hash01, seed_for

_SALT = 0x5E99


def partner_sources(ids: Tensor, nbr: Tensor, rho: float, seed: int, epoch: int) -> Tensor:
    """ids [B] int64 (CPU) -> source ids [B] of the key view: a uniformly chosen valid partner with prob rho."""
    if rho <= 0:
        return ids
    u = hash01(ids, 2, salt=seed_for(seed, epoch, _SALT) & 0xFFFFFFF)  # [B, 2] uniform
    cand = nbr[ids]  # [B, k]
    n_valid = (cand >= 0).sum(1)
    pick = (u[:, 1] * n_valid).long().clamp(max=cand.shape[1] - 1)
    partner = cand.gather(1, pick[:, None]).squeeze(1)
    use = (u[:, 0] < rho) & (n_valid > 0)
    return torch.where(use, partner, ids)
