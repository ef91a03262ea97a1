"""Target distributions ("label assignment") of SCE, SLR and IFND as pure tensor functions.

DESIGN.md "Objective contract". Conventions shared by every function here:

* ``teacher_sims``, ``valid``, the returned targets: ``[B, C]``; ``pos``: ``[B]`` int64, the column of row i's
  positive; labels: ``[L, B]`` (rows) and ``[L, C]`` (columns), integer, ``-1`` (any negative value) = not accepted.
* ``valid`` False means "not in the softmax denominator"; ``None`` means every column is valid. The positive's
  column is treated as valid by every target (the contract guarantees it is; forcing it keeps rows summing to 1
  even when a caller's mask forgets it).
* Every returned target is fp32, 0 on invalid columns, rows sum to 1 over valid columns, and never requires grad:
  targets are computed under ``torch.no_grad`` from detached inputs, so no gradient reaches the teacher.
* Scalars that a schedule may set per row (``lam``, ``mu``) may be Python floats or ``[B]`` tensors; temperatures
  may be floats or ``[B]`` tensors too. Nothing here syncs with the host.

These functions are the ground truth that the numba kernels in ``fastcl.kernels`` are tested against.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "sce_target",
    "slr_target",
    "ifnd_false_negatives",
    "ifnd_valid",
    "ifnd_attraction_target",
    "multi_positive_target",
]


def _row_param(x: float | Tensor, ref: Tensor) -> float | Tensor:
    """A per-row scalar as something that broadcasts against [B, C]: a float stays a float, a [B] tensor -> [B, 1]."""
    if isinstance(x, Tensor):
        x = x.detach().to(device=ref.device, dtype=torch.float32)
        return x.reshape(-1, 1) if x.dim() > 0 else x
    return float(x)


def _pos_mask(pos: Tensor, shape: torch.Size, device: torch.device) -> Tensor:
    """[B] column ids -> [B, C] bool, True only at (i, pos[i])."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    mask.scatter_(1, pos.view(-1, 1).to(device=device, dtype=torch.int64), True)
    return mask


def _scaled_logits(teacher_sims: Tensor, temperature: float | Tensor, valid: Tensor | None) -> Tensor:
    """teacher_sims / temperature as a fresh fp32 [B, C] tensor, -inf on invalid columns.

    Always a new tensor (never a view of the caller's), so the callers below may edit it in place: at
    256 x 65,536 every avoided temporary is a 64 MB allocation plus its page faults.
    """
    sims = teacher_sims.detach()
    logits = sims.float() / _row_param(temperature, sims)
    if valid is not None:
        logits.masked_fill_(~valid.to(logits.device), float("-inf"))
    return logits


def _softmax_or_zero(logits: Tensor, maybe_empty: bool) -> tuple[Tensor, Tensor | None]:
    """Row softmax of [B, C] logits (-inf = excluded); a row with no finite logit becomes all zeros, not NaN.

    Returns (probs [B, C], empty [B, 1] bool or None when ``maybe_empty`` is False and no check was needed).
    """
    if not maybe_empty:
        return torch.softmax(logits, dim=1), None
    empty = logits.amax(dim=1, keepdim=True) == float("-inf")
    return torch.softmax(logits, dim=1).masked_fill_(empty, 0.0), empty


def sce_target(teacher_sims: Tensor, pos: Tensor, lam: float | Tensor, tau_m: float | Tensor,
               valid: Tensor | None = None, *, self_logit: float | None = None) -> Tensor:
    """SCE target  λ·e_pos + (1−λ)·softmax_{j≠pos, valid}(teacher_sims/τ_m).   (DESIGN.md contract)

    teacher_sims [B, C] (cosines of the EMA key with every candidate), pos [B] int64, lam float | [B],
    tau_m float | [B], valid [B, C] bool | None  ->  [B, C] fp32.

    ``self_logit=None`` (default) is the paper's exact self-exclusion: the positive gets no relational mass.
    ``self_logit=x`` is the official code's compatibility mode (METHODS.md §5.6(1)): the positive column enters
    the relational softmax with teacher LOGIT ``x`` (already on the logit scale, not divided by τ_m; the code
    sets the similarity to 0, i.e. logit 0.0), so its weight is λ + (1−λ)·exp(x)/Z.
    A row whose only valid column is the positive (exact mode) gets the one-hot target: there is nothing to
    relate to, so the relational mass goes to the positive rather than becoming NaN.
    """
    with torch.no_grad():
        logits = _scaled_logits(teacher_sims, tau_m, valid)
        idx = pos.view(-1, 1).to(device=logits.device, dtype=torch.int64)
        # The positive's column: -inf (exact exclusion) or the fixed compatibility logit; either way it is
        # part of the row even if a caller's mask forgot it.
        logits.scatter_(1, idx, float("-inf") if self_logit is None else float(self_logit))
        maybe_empty = self_logit is None and (valid is not None or logits.shape[1] == 1)
        rel, empty = _softmax_or_zero(logits, maybe_empty)
        lam_ = _row_param(lam, logits)
        b = logits.shape[0]
        # λ per row as a [B, 1] device tensor; a float becomes a fill (no host-to-device copy on CUDA).
        keep_pos = (lam_.reshape(-1, 1).expand(b, 1) if isinstance(lam_, Tensor)
                    else torch.full((b, 1), lam_, dtype=torch.float32, device=logits.device))
        if empty is not None:  # relational mass with no column to go to goes to the positive
            keep_pos = torch.where(empty, torch.ones_like(keep_pos), keep_pos)
        # rel[i, pos] is 0 (exact) or exp(x)/Z (compat): adding λ there gives both modes' positive weight.
        return rel.mul_(1.0 - lam_).scatter_add_(1, idx, keep_pos.contiguous())


def slr_target(teacher_sims: Tensor, pos: Tensor, mu: float | Tensor, temperature: float | Tensor,
               valid: Tensor | None = None) -> Tensor:
    """SLR refined label (e_pos + µ·max(p)·p + µ·max(q)·q)/z, z = 1 + µ·max p + µ·max q.   (DESIGN.md contract)

    teacher_sims [B, C], pos [B] int64, mu float | [B], temperature float | [B] (= τ·τ'), valid [B, C] | None
    -> [B, C] fp32.  p = softmax over valid columns (the positive included) of teacher_sims/temperature;
    q = the same softmax with the positive excluded, q_pos = 0 (METHODS.md §2.1, Eq. 5).
    A row whose only valid column is the positive has no q: we take q = 0 (so max q = 0), which gives
    p = e_pos and ȳ = e_pos.
    """
    with torch.no_grad():
        logits = _scaled_logits(teacher_sims, temperature, valid)
        idx = pos.view(-1, 1).to(device=logits.device, dtype=torch.int64)
        if valid is not None:  # the positive is always a candidate of p
            logits.scatter_(1, idx, teacher_sims.detach().float().gather(1, idx) / _row_param(temperature, logits))
        p = torch.softmax(logits, dim=1)
        logits.scatter_(1, idx, float("-inf"))
        q, _ = _softmax_or_zero(logits, valid is not None or logits.shape[1] == 1)
        mu_ = _row_param(mu, logits)
        wp = mu_ * p.amax(dim=1, keepdim=True)
        wq = mu_ * q.amax(dim=1, keepdim=True)
        inv_z = 1.0 / (1.0 + wp + wq)
        target = p.mul_(wp * inv_z).add_(q.mul_(wq * inv_z))
        return target.scatter_add_(1, idx, inv_z.expand(-1, 1).contiguous())


def ifnd_false_negatives(pos: Tensor, row_labels: Tensor, col_labels: Tensor) -> Tensor:
    """Detected false negatives: [B, C] bool, True where row i and column j share an accepted label at ANY level.

    pos [B] int64, row_labels [L, B] int, col_labels [L, C] int; a negative label is "not accepted" and matches
    nothing, not even another negative label. The positive's column is never a false negative.
    One [B, C] temporary per level (not one [L, B, C] tensor): 3 levels x 256 x 65,536 would be 50 MB of bools.
    """
    with torch.no_grad():
        if row_labels.dim() == 1:
            row_labels, col_labels = row_labels.unsqueeze(0), col_labels.unsqueeze(0)
        device = col_labels.device
        row_labels = row_labels.to(device=device, dtype=torch.int64)
        col_labels = col_labels.to(dtype=torch.int64)
        # Unaccepted labels: -1 on the column side, -2 on the row side, so no unaccepted pair can ever match
        # (an O(B + C) rewrite instead of an extra [B, C] "row label >= 0" pass).
        rows = torch.where(row_labels >= 0, row_labels, torch.full_like(row_labels, -2))
        cols = torch.where(col_labels >= 0, col_labels, torch.full_like(col_labels, -1))
        fn = torch.zeros(rows.shape[1], cols.shape[1], dtype=torch.bool, device=device)
        for r, c in zip(rows, cols):
            fn |= r.view(-1, 1) == c.view(1, -1)
        fn.scatter_(1, pos.view(-1, 1).to(device=device, dtype=torch.int64), False)
        return fn


def ifnd_valid(pos: Tensor, row_labels: Tensor, col_labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """IFND elimination mask: ``valid & ~FN``.   (DESIGN.md contract)

    pos [B] int64, row_labels [L, B], col_labels [L, C] (−1 = not accepted), valid [B, C] bool | None
    -> [B, C] bool. Detected false negatives (shared accepted label at any level) leave the denominator; the
    positive is never masked (its entry keeps ``valid``'s value), so the target stays one-hot on it.
    """
    with torch.no_grad():
        fn = ifnd_false_negatives(pos, row_labels, col_labels)
        return ~fn if valid is None else valid.to(fn.device) & ~fn


def ifnd_attraction_target(pos: Tensor, row_labels: Tensor, col_labels: Tensor,
                           valid: Tensor | None = None) -> Tensor:
    """IFND attraction target: uniform over {pos} ∪ detected FNs (valid ones only).   (DESIGN.md contract)

    pos [B] int64, row_labels [L, B], col_labels [L, C], valid [B, C] bool | None -> [B, C] fp32.
    The denominator is NOT changed (attraction keeps every candidate); pair it with the caller's ``valid``.
    """
    with torch.no_grad():
        fn = ifnd_false_negatives(pos, row_labels, col_labels)
        if valid is not None:
            fn &= valid.to(fn.device)
        return multi_positive_target(fn | _pos_mask(pos, fn.shape, fn.device))


def multi_positive_target(pos_mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """Uniform target over the positives of each row (SePP multi-positive mode, true-label oracle).

    pos_mask [B, C] bool, valid [B, C] bool | None -> [B, C] fp32, 1/|P_i| on valid positives, 0 elsewhere.
    Every row should have at least one valid positive; a row without one gets an all-zero target (it then adds
    0 to the loss) instead of NaN, because checking it here would cost a host sync.
    """
    with torch.no_grad():
        mask = pos_mask.detach().bool()
        if valid is not None:
            mask = mask & valid.to(mask.device)
        t = mask.float()
        return t / t.sum(dim=1, keepdim=True).clamp_min(1.0)
