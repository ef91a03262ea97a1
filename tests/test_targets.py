"""Targets of SCE, SLR and IFND: the unit-testable facts of METHODS.md §2.8, §3.7, §5.7 and §6."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcl.objectives import (
    ifnd_attraction_target,
    ifnd_false_negatives,
    ifnd_valid,
    masked_log_softmax,
    mean_soft_cross_entropy,
    multi_positive_target,
    sce_target,
    slr_target,
    soft_cross_entropy,
)
from fastcl.methods.base import Sims
from fastcl.methods.ifnd import level_targets
from fastcl.objectives import one_hot_target

B, C = 6, 40


def _inputs(b: int = B, c: int = C, seed: int = 0):
    """Teacher cosines with the positive at a random column holding the key's own cosine 1.0."""
    g = torch.Generator().manual_seed(seed)
    sims = torch.rand(b, c, generator=g) * 2 - 1
    pos = torch.randint(0, c, (b,), generator=g)
    sims[torch.arange(b), pos] = 1.0
    valid = torch.rand(b, c, generator=g) > 0.3
    valid[torch.arange(b), pos] = True
    return sims, pos, valid


def _per_row_ce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-anchor soft CE (the summand of soft_cross_entropy). [B, C] -> [B]."""
    logp = masked_log_softmax(logits, valid)
    if valid is not None:
        logp = torch.where(valid, logp, torch.zeros_like(logp))
    return -(target * logp).sum(dim=1)


def _check_distribution(t: torch.Tensor, valid: torch.Tensor | None = None) -> None:
    assert t.dtype == torch.float32 and not t.requires_grad
    assert (t >= 0).all()
    torch.testing.assert_close(t.sum(dim=1), torch.ones(t.shape[0]), rtol=0, atol=1e-6)
    if valid is not None:
        assert (t[~valid] == 0).all()


# ------------------------------------------------------------------------------------------------------------- SCE

@pytest.mark.parametrize("use_valid", [False, True])
@pytest.mark.parametrize("self_logit", [None, 0.0])
def test_sce_is_a_distribution_with_pos_weight(use_valid, self_logit):
    sims, pos, valid = _inputs()
    v = valid if use_valid else None
    lam, tau = 0.3, 0.1
    t = sce_target(sims, pos, lam, tau, v, self_logit=self_logit)
    _check_distribution(t, v)
    w_pos = t[torch.arange(B), pos]
    if self_logit is None:
        torch.testing.assert_close(w_pos, torch.full((B,), lam))
    else:  # compat: the positive enters the relational softmax with logit self_logit
        keep = v.clone() if v is not None else torch.ones(B, C, dtype=torch.bool)
        keep[torch.arange(B), pos] = False
        z = torch.where(keep, torch.exp(sims / tau), torch.zeros(())).sum(1) + math.exp(self_logit)
        torch.testing.assert_close(w_pos, lam + (1 - lam) * math.exp(self_logit) / z)


def test_sce_self_logit_is_on_the_logit_scale():
    sims, pos, _ = _inputs()
    t = sce_target(sims, pos, 0.0, 0.2, self_logit=0.7)
    logits = sims / 0.2
    logits[torch.arange(B), pos] = 0.7  # not 0.7 / tau
    torch.testing.assert_close(t, torch.softmax(logits, 1))


def test_sce_lambda_one_is_moco_infonce():
    sims, pos, _ = _inputs()
    t = sce_target(sims, pos, 1.0, 0.05)
    torch.testing.assert_close(t, F.one_hot(pos, C).float())
    student = torch.randn(B, C) / 0.2
    torch.testing.assert_close(soft_cross_entropy(student, t), F.cross_entropy(student, pos))


def test_sce_relational_part_is_queue_softmax_and_ignores_positive_value():
    # MoCo layout: column 0 is the key, columns 1.. the queue.
    sims, _, _ = _inputs()
    pos = torch.zeros(B, dtype=torch.int64)
    lam, tau = 0.5, 0.07
    t = sce_target(sims, pos, lam, tau)
    torch.testing.assert_close(t[:, 1:] / (1 - lam), torch.softmax(sims[:, 1:] / tau, dim=1))
    other = sims.clone()
    other[:, 0] = torch.linspace(-1, 1, B)  # any value of the positive's similarity
    torch.testing.assert_close(sce_target(other, pos, lam, tau), t)


def test_sce_sharp_temperature_is_nearest_neighbour_one_hot():
    sims, pos, _ = _inputs()
    t = sce_target(sims, pos, 0.0, 1e-5)
    masked = sims.clone()
    masked[torch.arange(B), pos] = -float("inf")
    torch.testing.assert_close(t, F.one_hot(masked.argmax(1), C).float())


def test_sce_invalid_columns_and_empty_rows():
    sims, pos, valid = _inputs()
    valid[0] = False
    valid[0, pos[0]] = True  # row 0: only the positive -> nothing to relate to -> one-hot
    t = sce_target(sims, pos, 0.4, 0.1, valid)
    _check_distribution(t, valid)
    torch.testing.assert_close(t[0], F.one_hot(pos[0], C).float())
    # the relational part is the softmax over the valid non-positive columns only
    row = 1
    keep = valid[row].clone()
    keep[pos[row]] = False
    ref = torch.softmax(sims[row][keep] / 0.1, 0) * 0.6
    torch.testing.assert_close(t[row][keep], ref)


def test_sce_per_row_lambda_and_tau():
    sims, pos, valid = _inputs()
    lam = torch.linspace(0, 1, B)
    tau = torch.linspace(0.05, 0.5, B)
    t = sce_target(sims, pos, lam, tau, valid)
    for i in range(B):
        row = sce_target(sims[i:i + 1], pos[i:i + 1], float(lam[i]), float(tau[i]), valid[i:i + 1])
        torch.testing.assert_close(t[i:i + 1], row)


# ------------------------------------------------------------------------------------------------------------- SLR

def _slr_naive(sims, pos, mu, temperature, valid=None) -> torch.Tensor:
    """METHODS.md §2.1 row by row in float64, with q DEFINED as p restricted to k != i and renormalised."""
    out = torch.zeros(sims.shape, dtype=torch.float64)
    for i in range(sims.shape[0]):
        keep = torch.ones(sims.shape[1], dtype=torch.bool) if valid is None else valid[i].clone()
        keep[pos[i]] = True
        e = torch.where(keep, torch.exp(sims[i].double() / temperature), torch.zeros((), dtype=torch.float64))
        p = e / e.sum()
        q = p.clone()
        q[pos[i]] = 0.0
        q = q / q.sum()
        y = torch.zeros_like(p)
        y[pos[i]] = 1.0
        z = 1 + mu * p.max() + mu * q.max()
        out[i] = (y + mu * p.max() * p + mu * q.max() * q) / z
    return out.float()


@pytest.mark.parametrize("use_valid", [False, True])
def test_slr_matches_definition_with_q_as_renormalised_p(use_valid):
    sims, pos, valid = _inputs()
    v = valid if use_valid else None
    t = slr_target(sims, pos, 1.5, 0.16, v)
    _check_distribution(t, v)
    torch.testing.assert_close(t, _slr_naive(sims, pos, 1.5, 0.16, v), rtol=1e-5, atol=1e-7)


def test_slr_mu_zero_is_one_hot():
    sims, pos, valid = _inputs()
    torch.testing.assert_close(slr_target(sims, pos, 0.0, 0.2), F.one_hot(pos, C).float())
    torch.testing.assert_close(slr_target(sims, pos, 0.0, 0.2, valid), F.one_hot(pos, C).float())


@pytest.mark.parametrize("mu", [0.5, 1.0, 10.0])
def test_slr_positive_weight_bounds(mu):
    sims, pos, _ = _inputs()
    t = slr_target(sims, pos, mu, 0.16)
    temp = 0.16
    p = torch.softmax(sims / temp, 1)
    masked = (sims / temp).clone()
    masked[torch.arange(B), pos] = -float("inf")
    q = torch.softmax(masked, 1)
    z = 1 + mu * p.amax(1) + mu * q.amax(1)
    w = t[torch.arange(B), pos]
    assert (w >= 1 / z - 1e-6).all()
    assert (1 / z >= 1 / (1 + 2 * mu) - 1e-6).all()


def test_slr_per_row_mu_and_empty_rows():
    sims, pos, valid = _inputs()
    valid[2] = False
    valid[2, pos[2]] = True  # only the positive: q undefined -> target one-hot
    mu = torch.linspace(0, 3, B)
    t = slr_target(sims, pos, mu, 0.2, valid)
    _check_distribution(t, valid)
    torch.testing.assert_close(t[2], F.one_hot(pos[2], C).float())
    for i in range(B):
        torch.testing.assert_close(t[i:i + 1], slr_target(sims[i:i + 1], pos[i:i + 1], float(mu[i]), 0.2,
                                                          valid[i:i + 1]))


# ------------------------------------------------------------------------------------------------------------ IFND

def _labels(b: int = B, c: int = C, levels: int = 3, k: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, k, (levels, b), generator=g), torch.randint(-1, k, (levels, c), generator=g)


def test_ifnd_no_accepted_labels_is_the_base_loss():
    sims, pos, valid = _inputs()
    rl, cl = torch.full((2, B), -1), torch.full((2, C), -1)
    assert torch.equal(ifnd_valid(pos, rl, cl, valid), valid)
    assert ifnd_valid(pos, rl, cl).all()
    student = torch.randn(B, C)
    one_hot = F.one_hot(pos, C).float()
    torch.testing.assert_close(soft_cross_entropy(student, one_hot, ifnd_valid(pos, rl, cl)),
                               F.cross_entropy(student, pos))
    torch.testing.assert_close(ifnd_attraction_target(pos, rl, cl), one_hot)


def test_ifnd_elimination_never_raises_the_per_anchor_loss():
    sims, pos, valid = _inputs()
    rl, cl = _labels()
    student = torch.randn(B, C)
    one_hot = F.one_hot(pos, C).float()
    base = _per_row_ce(student, one_hot, valid)
    elim = _per_row_ce(student, one_hot, ifnd_valid(pos, rl, cl, valid))
    assert (elim <= base + 1e-6).all()
    assert (elim < base).any()  # the fixture does detect some false negatives


def test_ifnd_masking_one_false_negative_shifts_loss_by_log_ratio():
    student = torch.randn(1, 8)
    pos = torch.tensor([2])
    rl = torch.tensor([[5]])
    cl = torch.tensor([[0, 1, 5, 3, 5, 2, 4, 7]])  # column 4 shares label 5 (column 2 is the positive)
    v = ifnd_valid(pos, rl, cl)
    assert v.tolist() == [[True, True, True, True, False, True, True, True]]
    one_hot = F.one_hot(pos, 8).float()
    old, new = _per_row_ce(student, one_hot, None), _per_row_ce(student, one_hot, v)
    z = torch.exp(student).sum()
    torch.testing.assert_close(new - old, torch.log((z - torch.exp(student[0, 4])) / z).view(1))


def test_ifnd_positive_never_masked_and_unaccepted_never_match():
    pos = torch.tensor([0, 1])
    rl = torch.tensor([[3, -1]])
    cl = torch.tensor([[3, -1, 3, -1]])  # row 0's positive shares its label; row 1 is unaccepted
    v = ifnd_valid(pos, rl, cl)
    assert v.tolist() == [[True, True, False, True], [True, True, True, True]]
    valid = torch.tensor([[True, True, True, False], [True, True, False, True]])
    assert ifnd_valid(pos, rl, cl, valid).tolist() == [[True, True, False, False], [True, True, False, True]]


def test_ifnd_union_over_levels():
    pos = torch.tensor([0])
    rl = torch.tensor([[1], [7], [-1]])
    cl = torch.tensor([[9, 1, 0, 0, 2],   # level 0: column 1 matches
                       [9, 0, 7, 0, 2],   # level 1: column 2 matches
                       [9, 0, 0, 4, 2]])  # level 2: row unaccepted -> column 3 does not count
    assert ifnd_false_negatives(pos, rl, cl).tolist() == [[False, True, True, False, False]]
    assert ifnd_valid(pos, rl, cl).tolist() == [[True, False, False, True, True]]


# ------------------------------------------------------------ IFND hierarchy rules: union vs per_level (PCL-style)
# 1 anchor row, 6 candidate columns, the positive in column 0. Level "coarse" groups the anchor (label 0) with
# columns 1, 2, 3; level "fine" (nested in coarse) with column 1 only. Column 5 is unaccepted (-1) everywhere.
# The per_level rule is the one the method runs (methods.ifnd.level_targets on the torch backend): labels are per
# sample, the anchor is sample 0 and column j holds sample j (column 0: the anchor's own key, its positive).
H_POS = torch.tensor([0])
H_COL = {"coarse": torch.tensor([[0, 0, 0, 0, 1, -1]]), "fine": torch.tensor([[0, 0, 1, 2, 3, -1]])}
H_LOGITS = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5]])
H_SIMS = Sims(H_LOGITS, None, H_POS, torch.ones(1, 6, dtype=torch.bool), torch.tensor([0]), torch.arange(6))


def _h_labels(*names):
    """[L, 6] per-sample labels of the named levels."""
    return torch.cat([H_COL[n] for n in names])


def _levels(*names):
    """(row labels [L, 1], column labels [L, 6]) for the contract functions."""
    labels = _h_labels(*names)
    return labels[:, :1], labels


def _union_loss(rows, cols):
    return soft_cross_entropy(H_LOGITS, one_hot_target(H_POS, 6).prob, ifnd_valid(H_POS, rows, cols))


def _per_level_loss(*names):
    return mean_soft_cross_entropy(H_LOGITS, level_targets(H_SIMS, _h_labels(*names), "elim", backend="torch"))


def test_ifnd_per_level_masks_are_each_levels_elimination():
    rows, cols = _levels("coarse", "fine")
    coarse, fine = (t.valid for t in level_targets(H_SIMS, _h_labels("coarse", "fine"), "elim", backend="torch"))
    assert coarse.tolist() == [[True, False, False, False, True, True]]  # positive kept, 1-3 eliminated
    assert fine.tolist() == [[True, False, True, True, True, True]]      # only column 1
    # union = FN at any level = the coarse mask alone when the levels are nested
    assert torch.equal(ifnd_valid(H_POS, rows, cols), coarse)


def test_ifnd_per_level_with_identical_levels_equals_union():
    for names in (("coarse", "coarse"), ("fine", "fine", "fine")):
        rows, cols = _levels(*names)
        torch.testing.assert_close(_per_level_loss(*names), _union_loss(rows, cols))
        torch.testing.assert_close(_per_level_loss(*names), _union_loss(*_levels(names[0])))


def test_ifnd_per_level_with_nested_levels_averages_coarse_and_fine():
    rows, cols = _levels("coarse", "fine")
    lse = lambda cols_kept: torch.logsumexp(H_LOGITS[0, cols_kept], 0)  # noqa: E731
    coarse = lse([0, 4, 5]) - H_LOGITS[0, 0]      # -log p_pos with columns 1, 2, 3 eliminated
    fine = lse([0, 2, 3, 4, 5]) - H_LOGITS[0, 0]  # with column 1 eliminated
    torch.testing.assert_close(_union_loss(rows, cols), coarse)               # union: the coarse level decides
    torch.testing.assert_close(_per_level_loss("coarse", "fine"), (coarse + fine) / 2)
    assert float(_union_loss(rows, cols)) < float(_per_level_loss("coarse", "fine"))  # union eliminates more
    # swapping the level order changes nothing (a mean over levels)
    torch.testing.assert_close(_per_level_loss("fine", "coarse"), (coarse + fine) / 2)


def test_ifnd_per_level_attraction_targets():
    coarse, fine = (t.prob for t in level_targets(H_SIMS, _h_labels("coarse", "fine"), "attr", backend="torch"))
    torch.testing.assert_close(coarse, torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0, 0.0]]))
    torch.testing.assert_close(fine, torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError):
        mean_soft_cross_entropy(H_LOGITS, [])


def test_ifnd_attraction_is_uniform_over_positive_and_false_negatives():
    pos = torch.tensor([0, 2])
    rl = torch.tensor([[1, 2]])
    cl = torch.tensor([[1, 1, 2, 1, 2]])
    valid = torch.tensor([[True, True, True, False, True], [True] * 5])
    t = ifnd_attraction_target(pos, rl, cl, valid)
    torch.testing.assert_close(t, torch.tensor([[0.5, 0.5, 0, 0, 0], [0, 0, 0.5, 0, 0.5]]))
    student = torch.randn(2, 5)
    # attraction = CE(uniform over P(i), softmax over the unmasked candidates) (METHODS.md §3.7)
    logp = torch.log_softmax(student.masked_fill(~valid, -float("inf")), 1)
    expected = -torch.stack([logp[0, [0, 1]].mean(), logp[1, [2, 4]].mean()]).mean()
    torch.testing.assert_close(soft_cross_entropy(student, t, valid), expected)


def test_ifnd_batch_order_shuffle_permutes_the_result():
    sims, pos, valid = _inputs()
    rl, cl = _labels()
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(3))
    v = ifnd_valid(pos, rl, cl, valid)
    assert torch.equal(ifnd_valid(pos[perm], rl[:, perm], cl, valid[perm]), v[perm])
    a = ifnd_attraction_target(pos, rl, cl, valid)
    torch.testing.assert_close(ifnd_attraction_target(pos[perm], rl[:, perm], cl, valid[perm]), a[perm])
    # columns too (queue order): permute columns, their labels, and remap the positives' column ids
    cperm = torch.randperm(C, generator=torch.Generator().manual_seed(4))
    inv = torch.argsort(cperm)
    assert torch.equal(ifnd_valid(inv[pos], rl, cl[:, cperm], valid[:, cperm]), v[:, cperm])
    # and the loss is unchanged under the row shuffle
    student = torch.randn(B, C)
    one_hot = F.one_hot(pos, C).float()
    torch.testing.assert_close(soft_cross_entropy(student[perm], one_hot[perm], v[perm]),
                               soft_cross_entropy(student, one_hot, v))


def test_sce_slr_permutation_equivariant():
    sims, pos, valid = _inputs()
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sce_target(sims[perm], pos[perm], 0.5, 0.1, valid[perm]),
                               sce_target(sims, pos, 0.5, 0.1, valid)[perm])
    torch.testing.assert_close(slr_target(sims[perm], pos[perm], 1.0, 0.1, valid[perm]),
                               slr_target(sims, pos, 1.0, 0.1, valid)[perm])


# ------------------------------------------------------------------------------------------------ shared properties

def test_no_gradient_reaches_the_teacher():
    sims, pos, valid = _inputs()
    teacher = sims.clone().requires_grad_(True)
    rl, cl = _labels()
    targets = [sce_target(teacher, pos, 0.5, 0.1, valid), sce_target(teacher, pos, 0.5, 0.1, self_logit=0.0),
               slr_target(teacher, pos, 1.0, 0.2, valid), ifnd_attraction_target(pos, rl, cl, valid),
               multi_positive_target(valid)]
    for t in targets:
        assert not t.requires_grad and t.grad_fn is None
    student = torch.randn(B, C, requires_grad=True)
    loss = sum(soft_cross_entropy(student, t, valid) for t in targets[:1] + targets[2:4])
    loss.backward()
    assert student.grad is not None and teacher.grad is None


def test_multi_positive_target():
    pos_mask = torch.tensor([[True, False, True, True], [False, True, False, False], [False] * 4])
    valid = torch.tensor([[True, True, True, False], [True] * 4, [True] * 4])
    t = multi_positive_target(pos_mask, valid)
    torch.testing.assert_close(t, torch.tensor([[0.5, 0, 0.5, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]]))


def test_targets_accept_bf16_and_int32_inputs():
    sims, pos, valid = _inputs()
    t16 = sce_target(sims.bfloat16(), pos, 0.5, 0.1, valid)
    assert t16.dtype == torch.float32
    torch.testing.assert_close(t16, sce_target(sims.bfloat16().float(), pos, 0.5, 0.1, valid))
    rl, cl = _labels()
    assert torch.equal(ifnd_valid(pos, rl.int(), cl.int(), valid), ifnd_valid(pos, rl, cl, valid))


def test_targets_stay_finite_at_extreme_temperatures():
    sims, pos, valid = _inputs()
    for tau in (1e-6, 1e6):
        for t in (sce_target(sims, pos, 0.5, tau, valid), slr_target(sims, pos, 2.0, tau, valid)):
            assert np.isfinite(t.numpy()).all()
            _check_distribution(t, valid)
