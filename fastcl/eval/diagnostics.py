"""Label-assignment quality against ground truth, logged during training.

These functions READ TRUE LABELS; they only look at the step's similarity layout and target after the fact
and never feed back into training (tests/test_methods.py: permuting the labels leaves training bit-identical).
Definitions (per logged step, over the last (query, key) pair of the step):
  fn_share                 share of valid non-positive candidates that share the anchor's true class
  fn_masked_precision/...  "detected" = non-positive candidates the method removed from the denominator
                           (elimination) or treated as positives: target mass >= half the row's positive's
                           (attraction, SePP partners); precision/recall/F1 of detected against true same-class
                           ones. Our choice of threshold: soft targets (SCE, SLR) put a little mass on EVERY
                           column, which is not a detection; their measure is target_same_class_mass.
  target_same_class_mass   mean target mass on same-class non-positive columns
  pseudo_label_precision_l share of same-pseudo-label candidate pairs (level l) that share the true class
and, with every kNN evaluation, `feature_rank` = effective_rank() of the held-out backbone features.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fastcl.objectives.backend import lookup
from fastcl.objectives.loss import Target

if TYPE_CHECKING:  # the methods call these functions; the diagnostics only read a Sims' fields
    from fastcl.methods.base import Sims


def _prf(detected: Tensor, truth: Tensor, prefix: str) -> dict[str, Tensor]:
    tp = (detected & truth).sum().float()
    p = tp / detected.sum().clamp(min=1)
    r = tp / truth.sum().clamp(min=1)
    return {f"{prefix}_precision": p, f"{prefix}_recall": r, f"{prefix}_f1": 2 * p * r / (p + r).clamp(min=1e-12)}


@torch.no_grad()
def fn_diagnostics(sims: Sims, target: Target, labels_by_id: Tensor, pseudo_labels: Tensor | None = None) -> dict:
    """Device tensors (no host sync) of the diagnostics above. labels_by_id: [N] true labels (-1 unknown)."""
    lab = labels_by_id.to(sims.pos.device).view(1, -1)
    rows, cols = lookup(lab, sims.row_ids)[0], lookup(lab, sims.col_ids)[0]
    b = sims.pos.shape[0]
    nonpos = sims.valid.clone()
    nonpos[torch.arange(b, device=nonpos.device), sims.pos] = False  # candidates that are negatives by default
    same = (rows[:, None] == cols[None, :]) & (rows[:, None] >= 0) & nonpos
    out = {"fn_share": same.sum().float() / nonpos.sum().clamp(min=1)}
    tvalid = target.valid if target.valid is not None else sims.valid
    pos_mass = target.prob.gather(1, sims.pos.view(-1, 1))
    detected = nonpos & (~tvalid | (target.prob >= 0.5 * pos_mass))  # eliminated, or attracted as a positive
    if bool(detected.any()):  # host sync: log steps only
        out.update(_prf(detected, same, "fn_masked"))
    out["target_same_class_mass"] = (target.prob.float() * same).sum(1).mean()
    if pseudo_labels is not None:
        for lvl in range(pseudo_labels.shape[0]):
            pr, pc = lookup(pseudo_labels[lvl:lvl + 1], sims.row_ids)[0], lookup(pseudo_labels[lvl:lvl + 1], sims.col_ids)[0]
            same_pl = (pr[:, None] == pc[None, :]) & (pr[:, None] >= 0) & nonpos
            out[f"pseudo_label_precision_l{lvl}"] = (same_pl & same).sum().float() / same_pl.sum().clamp(min=1)
    return out


@torch.no_grad()
def effective_rank(features: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., 2023): exp of the entropy of the normalised singular values of [N, D] features.

    A collapse indicator that needs no labels: D for isotropic features, 1 for features on a line. Logged with
    every kNN evaluation (on the held-out split's backbone features) as `feature_rank`.
    """
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))
