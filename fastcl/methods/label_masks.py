"""Label-driven assignment shared by IFND (pseudo-labels) and the oracle (true labels).

Labels are per dataset sample ([L, N], -1 = no label); rows and columns are looked up through their
global ids, so queue entries get the CURRENT labels even when they were enqueued before a re-clustering.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcl import kernels
from fastcl.methods.base import Sims
from fastcl.objectives import Target, one_hot_target


def lookup(labels: Tensor, ids: Tensor) -> Tensor:
    """labels [L, N], ids [n] (-1 = empty slot) -> [L, n] with -1 where ids < 0."""
    out = labels[:, ids.clamp(min=0)]
    return torch.where(ids[None] >= 0, out, torch.full_like(out, -1))


def label_target(sims: Sims, labels: Tensor, mode: str, backend: str = "auto") -> Target:
    """elim: same-label columns leave the denominator (one-hot target); attr: they become uniform positives.

    The positive is never masked (ifnd_valid guarantees it), so no row can lose every candidate.
    """
    rows, cols = lookup(labels, sims.row_ids), lookup(labels, sims.col_ids)
    if mode == "elim":
        valid = kernels.ifnd_valid(sims.pos, rows, cols, sims.valid, backend=backend)
        return one_hot_target(sims.pos, sims.valid.shape[1], valid)
    prob = kernels.ifnd_attraction_target(sims.pos, rows, cols, sims.valid, backend=backend)
    return Target(prob, sims.valid)


def level_targets(sims: Sims, labels: Tensor, mode: str, backend: str = "auto") -> list[Target]:
    """IFND's per_level rule: one `label_target` per clustering level (labels [L, N] -> L Targets), i.e.
    `objectives.targets.ifnd_level_valids` / `ifnd_level_attraction_targets` on the kernel backend."""
    return [label_target(sims, labels[lv:lv + 1], mode, backend) for lv in range(labels.shape[0])]

