"""The targets API the methods call: the label-assignment targets with a `backend` keyword, and the targets of
per-sample labels built on them (`label_target`, IFND's pseudo-labels and the oracle's true labels).

backend: "torch" runs the reference (`targets.py`, the default), "numba" and "auto" go through `fastcl.kernels`
(numba CPU / numba.cuda by the tensors' device and size), imported on the first such call only. The kernels take
`targets.py` as their reference, so the dispatch lives here, above both.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from fastcl.objectives import targets as _targets
from fastcl.objectives.loss import Target, one_hot_target


def _with_backend(name: str):
    ref = getattr(_targets, name)

    @functools.wraps(ref)
    def call(*args, backend: str = "torch", **kwargs):
        if backend == "torch":
            return ref(*args, **kwargs)
        from fastcl import kernels  # numba (and numba.cuda for CUDA tensors) only from here
        return getattr(kernels, name)(*args, backend=backend, **kwargs)
    return call


sce_target = _with_backend("sce_target")
slr_target = _with_backend("slr_target")
ifnd_valid = _with_backend("ifnd_valid")
ifnd_attraction_target = _with_backend("ifnd_attraction_target")


# Labels are per dataset sample ([L, N], -1 = no label); rows and columns are looked up through their global ids,
# so queue entries get the CURRENT labels even when they were enqueued before a re-clustering.
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
