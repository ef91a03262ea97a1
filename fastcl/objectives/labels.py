"""Targets driven by per-sample labels: IFND's accepted pseudo-labels and the oracle's true labels (marked).

Labels are per dataset sample ([L, N], -1 = no label); rows and columns are looked up through their global ids,
so queue entries get the CURRENT labels even when they were enqueued before a re-clustering.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcl.objectives.backend import ifnd_attraction_target, ifnd_valid
from fastcl.objectives.loss import Target, one_hot_target


def lookup(labels: Tensor, ids: Tensor) -> Tensor:
    """labels [L, N], ids [n] (-1 = empty slot) -> [L, n] with -1 where ids < 0."""
    out = labels[:, ids.clamp(min=0)]
    return torch.where(ids[None] >= 0, out, torch.full_like(out, -1))


def label_target(pos: Tensor, valid: Tensor, row_ids: Tensor, col_ids: Tensor, labels: Tensor, mode: str,
                 backend: str = "auto") -> Target:
    """pos [B] positive column, valid [B, C] candidates, row_ids [B] / col_ids [C] global ids, labels [L, N].

    elim: a column sharing an accepted label with the row (at any of the L levels) leaves the denominator
    (one-hot target); attr: such columns become uniform positives beside the positive. The positive is never
    masked (ifnd_valid guarantees it), so no row can lose every candidate."""
    rows, cols = lookup(labels, row_ids), lookup(labels, col_ids)
    if mode == "elim":
        return one_hot_target(pos, valid.shape[1], ifnd_valid(pos, rows, cols, valid, backend=backend))
    return Target(ifnd_attraction_target(pos, rows, cols, valid, backend=backend), valid)
