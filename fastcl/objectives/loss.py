"""The one loss every method uses: cross-entropy between a target distribution and masked student logits."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Target(NamedTuple):
    """What an assigner returns for a [B, C] similarity matrix.

    prob:  [B, C] float, rows sum to 1 over valid columns, zero on invalid ones; never requires grad.
    valid: [B, C] bool or None; False = not in the softmax denominator (empty queue slot, self-pair,
           eliminated false negative). None = all columns valid.
    """

    prob: Tensor
    valid: Tensor | None = None


def masked_log_softmax(logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """log_softmax over columns with invalid ones excluded. [B, C] -> [B, C] (fp32; -inf where invalid).

    fp32 on purpose: teacher temperatures as low as 0.05 give logits of +-20 that bf16 rounds badly.
    """
    logits = logits.float()
    if valid is not None:
        # A row with no valid column would give NaN: callers guarantee the positive is always valid.
        logits = logits.masked_fill(~valid, float("-inf"))
    return torch.log_softmax(logits, dim=1)


def soft_cross_entropy(logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """mean_i -sum_j target_ij * log_softmax(logits_i masked by valid)_j.   (DESIGN.md contract)

    logits, target, valid: [B, C]. Returns a scalar (fp32). Where valid is False the target must be 0;
    those entries contribute exactly 0 (we multiply by where(valid, logp, 0): 0 * -inf would be NaN).
    """
    logp = masked_log_softmax(logits, valid)
    if valid is not None:
        logp = torch.where(valid, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return -(target.float() * logp).sum(dim=1).mean()


def mean_soft_cross_entropy(logits: Tensor, targets) -> Tensor:
    """mean_m soft_cross_entropy(logits, T_m.prob, T_m.valid) over M label assignments of the same logits
    (IFND's per-level rule; PCL's ProtoNCE averages its M clusterings the same way). logits [B, C]; targets: a
    non-empty sequence of Target over [B, C]. -> scalar fp32."""
    targets = list(targets)
    if not targets:
        raise ValueError("mean_soft_cross_entropy needs at least one target")
    return torch.stack([soft_cross_entropy(logits, t.prob, t.valid) for t in targets]).mean()


def one_hot_target(pos: Tensor, num_cols: int, valid: Tensor | None = None) -> Target:
    """Plain InfoNCE target: e_pos for every row. pos: [B] int64 -> Target([B, C], valid)."""
    prob = torch.zeros(pos.shape[0], num_cols, device=pos.device)
    prob.scatter_(1, pos.view(-1, 1), 1.0)
    return Target(prob, valid)
