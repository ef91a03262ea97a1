"""DCL: the debiased contrastive loss (Chuang et al., NeurIPS 2020; official code chingyaoc/DCL, main.py).

The label-free baseline that false-negative methods are compared against. Contrastive learning treats every
other candidate as a negative, but with C classes a fraction tau+ ~ 1/C of them share the anchor's class. DCL
corrects the negative term without labels: from the M negatives' mean exp-similarity and the positive's, it
estimates the mean over TRUE negatives,

    Ng = max( (sum_neg exp(s_j / tau) - tau+ * M * exp(s_pos / tau)) / (1 - tau+),  M * exp(-1 / tau) )
    loss = -log( exp(s_pos / tau) / (exp(s_pos / tau) + Ng) )

(the max is the official code's lower bound: each true negative contributes at least exp(-1/tau), cosine -1).
tau+ = 0 is plain InfoNCE. The candidate layout is the base's (`method.base`): SimCLR's 2B in-batch views
(M = 2B - 2, as the official code) or MoCo-v2's [own key ; queue] (M = the valid queue entries).

The target stays the base's one-hot (used by the diagnostics only); the loss replaces the pair's soft
cross-entropy in `pair_loss`. Everything is computed shifted by 1/tau (cosines <= 1), so no exp overflows at
small temperatures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastcl.methods.base import ContrastiveMethod, Pair


@dataclass
class DCLConfig:
    """method.dcl"""
    tau_plus: float = 0.1  # class prior: the expected share of same-class negatives (official `--tau_plus 0.1`)
    clamp: bool = True  # the official lower bound Ng >= M exp(-1/tau) ("constrain (optional)")

    @staticmethod
    def checks(c) -> list[tuple[str, bool, str]]:
        return [("tau_plus", 0 <= c.tau_plus < 1, f"must lie in [0, 1), got {c.tau_plus}")]


def negative_estimate(student: Tensor, pos: Tensor, valid: Tensor, tau: float,
                      tau_plus: float) -> tuple[Tensor, Tensor, Tensor]:
    """DCL's estimate of the true negatives' term, before its lower bound, in logits shifted by 1/tau.

    student [B, C] cosines, pos [B] positive column, valid [B, C] candidates (the positive included) ->
    (pos_logit [B], ng [B] = (sum_neg exp - tau+ * M * exp(pos)) / (1 - tau+), bound [B] = M exp(-1/tau)).
    ng < bound means the estimate is clamped: the row's negatives then get no gradient, only its positive does.
    That happens when tau+ * M * exp(s_pos / tau) outweighs the negatives' sum, i.e. at a low tau or a large M."""
    rows = torch.arange(student.shape[0], device=student.device)
    logits = student.float() / tau - 1.0 / tau  # shifted: every exp below is <= 1
    pos_logit = logits[rows, pos]  # [B]
    neg = valid.clone()
    neg[rows, pos] = False
    m = neg.sum(1).to(logits.dtype)  # [B] negatives per row
    neg_sum = torch.where(neg, logits.exp(), torch.zeros_like(logits)).sum(1)  # [B]
    ng = (neg_sum - tau_plus * m * pos_logit.exp()) / (1.0 - tau_plus)
    return pos_logit, ng, m * math.exp(-2.0 / tau)  # M exp(-1/tau), shifted by exp(-1/tau)


def debiased_loss(student: Tensor, pos: Tensor, valid: Tensor, tau: float, tau_plus: float,
                  clamp: bool = True) -> Tensor:
    """Mean DCL loss [] of rows with cosines student [B, C] (with grad), positive column pos [B] and candidate mask
    valid [B, C] (the positive included). M per row = valid candidates minus the positive."""
    pos_logit, ng, bound = negative_estimate(student, pos, valid, tau, tau_plus)
    if clamp:
        ng = torch.maximum(ng, bound)
    return (torch.log(pos_logit.exp() + ng) - pos_logit).mean()


class DCL(ContrastiveMethod):
    section, Config = "dcl", DCLConfig
    follows_base = True  # SimCLR or MoCo-v2 layout (method.base)

    def pair_loss(self, pair: Pair, extras: list[Tensor], sc: dict, step: int) -> Tensor:
        s = pair.sims
        return debiased_loss(s.student, s.pos, s.valid, self.tau, self.c.tau_plus, self.c.clamp)
