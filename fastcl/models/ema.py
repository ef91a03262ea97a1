"""EMA (momentum) teacher: creation and in-place update.

    teacher = make_teacher(student)              # once, before wrapping in DDP / compile is fine too
    ema_update(teacher, student, m)              # every step, after optimizer.step()

Only parameters are averaged. Buffers (BN running statistics) are the teacher's own: it runs its forward
passes in train mode, so its BN layers track the statistics of the keys it encodes, as MoCo's key encoder
(facebookresearch/moco `moco/builder.py` `_momentum_update_key_encoder` loops over `parameters()` only) and
SCE's momentum branch do. Evaluating the teacher (kNN monitor, IFND `source=pass`, SePP mining,
`--which teacher`) therefore uses statistics of the teacher's own activations, not the student's.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers, any nesting."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def make_teacher(student: nn.Module) -> nn.Module:
    """Deep copy of the (unwrapped) student with requires_grad False; same mode, device and dtype."""
    teacher = copy.deepcopy(unwrap(student))
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None  # deepcopy copies .grad too; a teacher never needs one
    return teacher


def _pairs(teacher, student, what: str):
    """Student tensors aligned with the teacher's by name (the student may hold more, e.g. a predictor)."""
    src = dict(student)
    t_list, s_list = [], []
    for name, t in teacher:
        s = src.get(name)
        if s is None:
            raise KeyError(f"ema_update: teacher {what} {name!r} has no counterpart in the student")
        t_list.append(t)
        s_list.append(s)
    return t_list, s_list


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: teacher params <- m * teacher + (1 - m) * student. Buffers (BN running statistics) are NOT
    touched: the teacher keeps its own (module docstring).

    Matching is by parameter name after unwrapping DDP/compile, so a DDP-wrapped student works and a
    student with extra parameters (predictor) is fine. m = 1 leaves the teacher as is; m = 0 copies the
    parameters.
    """
    teacher, student = unwrap(teacher), unwrap(student)
    t_p, s_p = _pairs(teacher.named_parameters(), student.named_parameters(), "parameter")
    if t_p:
        # One multi-tensor kernel instead of 2 launches per parameter (161 parameters in ResNet-50).
        # lerp (t += (1-m)(s-t)) moves 3 tensors' worth of memory; mul_ then add_ would move 5. It is
        # exact at the ends: weight 0 keeps t, weight 1 gives s.
        torch._foreach_lerp_(t_p, s_p, 1.0 - momentum)
