"""One training step, readable top to bottom (DESIGN.md "One training step").

    ema update -> q = normalize(student(view_q)); k = normalize(teacher(view_k)) -> gather keys + ids once
    -> sims over [batch keys ; queue] -> target = method.assign(...) -> soft CE -> backward -> step
    -> method.after_step(keys, ids): queue push / table update

No host sync happens here: the returned metrics are device tensors, read by the trainer every
`trainer.log_every` steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import dist
from fastcl.methods.base import ContrastiveMethod, Sims
from fastcl.models import ema_update
from fastcl.objectives import soft_cross_entropy
from fastcl.pipelines.batch import Batch
from fastcl.timing import StageTimer


class Student(nn.Module):
    """The online network: encoder (backbone + projector) followed by the predictor (Identity if none)."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor(self.encoder(x))


@dataclass
class StepParts:
    student: nn.Module  # Student, possibly DDP-wrapped by accelerate
    teacher: nn.Module | None  # EMA copy of the encoder; None for in-batch methods (SimCLR)
    method: ContrastiveMethod
    optimizer: torch.optim.Optimizer
    accelerator: object
    precision: str  # "fp32" | "bf16"
    channels_last: bool
    clip_grad: float
    timer: StageTimer | None = None  # per-stage timing (CUDA events / perf counters), read at log steps
    skip_nonfinite: bool = False  # skip the update of a step whose loss or gradient is not finite


def _stage(parts: StepParts, name: str):
    return parts.timer(name) if parts.timer is not None else contextlib.nullcontext()


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _embed(net: nn.Module, x: Tensor, parts: StepParts) -> Tensor:
    """L2-normalised fp32 embedding [B, D] (normalise in fp32: cosines feed temperatures as low as 0.05)."""
    if parts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(x.device, parts.precision):
        z = net(x)
    return F.normalize(z.float(), dim=1)


def queue_pair_loss(parts: StepParts, batch: Batch, qv: int, kv: int, ids_all: Tensor, sc: dict,
                    step: int) -> tuple[Tensor, Tensor, dict]:
    """MoCo layout for one (query view, key view) pair. Returns (loss, gathered keys [WB,D], logs)."""
    method, views = parts.method, batch.views
    b, r = views[qv].shape[0], dist.rank()
    with _stage(parts, "forward"):
        q = _embed(parts.student, views[qv], parts)  # [B, D]
        with torch.no_grad():
            k = _embed(parts.teacher, views[kv], parts)  # [B, D]
    with _stage(parts, "gather"):
        k_all = dist.gather(k)  # [WB, D], once per pair
    wb = k_all.shape[0]
    pos = r * b + torch.arange(b, device=q.device)  # own key's column in the gathered batch
    cols, col_ids = k_all, ids_all
    if method.queue is not None:
        # Snapshot of the queue BEFORE this step's push (pushed in after_step).
        cols = torch.cat([k_all, method.queue.keys.to(k_all.dtype)])
        col_ids = torch.cat([ids_all, method.queue.ids])
    valid = (col_ids >= 0).unsqueeze(0).expand(b, -1).clone()  # empty queue slots are not candidates
    if not parts.method.cfg.method.batch_negatives:
        valid[:, :wb] = False  # MoCo: only the own key among the batch keys
    valid[torch.arange(b, device=q.device), pos] = True
    with _stage(parts, "assign"):
        student_sims = q @ cols.T  # [B, C]
        teacher_sims = (k @ cols.T) if method.needs_teacher_sims else None
        sims = Sims(student_sims, teacher_sims, pos, valid, batch.index, col_ids)
        target = method.assign(sims, sc)
        loss = soft_cross_entropy(student_sims / method.tau, target.prob, target.valid)
        extra = method.extra_loss(dict(parts=parts, batch=batch, qv=qv, kv=kv, cols=cols, sims=sims, target=target,
                                       base_loss=loss, sc=sc, step=step))
    if extra is not None:
        loss = extra  # the method combines base and extra terms itself (e.g. (1-λ)·L_c + λ·L_mix)
    # the pair's layout and target stay available to the trainer's diagnostics (read at log steps only)
    logs = {"pos_sim": (q * k).sum(1).mean().detach(), "_sims": sims, "_target": target}
    return loss, k_all, logs


def inbatch_loss(parts: StepParts, batch: Batch, ids_all: Tensor, sc: dict) -> tuple[Tensor, Tensor, Tensor, dict]:
    """SimCLR layout: rows = this rank's 2B views, columns = all 2WB gathered views (with gradient)."""
    method, views = parts.method, batch.views
    b, r = views[0].shape[0], dist.rank()
    # One forward over both views (as SimCLR does): BN statistics over the 2B images, and one forward per
    # backward keeps DDP's gradient reduction exact (two forwards before one backward drifted on 2 ranks).
    with _stage(parts, "forward"):
        z1, z2 = _embed(parts.student, torch.cat([views[0], views[1]]), parts).split(b)
    with _stage(parts, "gather"):
        c1, c2 = dist.gather_with_grad(z1), dist.gather_with_grad(z2)  # [WB, D] each, gradients flow back
    wb = c1.shape[0]
    cols = torch.cat([c1, c2])  # [2WB, D]
    rows = torch.cat([z1, z2])  # [2B, D]
    ar = r * b + torch.arange(b, device=z1.device)
    self_col = torch.cat([ar, wb + ar])
    pos = torch.cat([wb + ar, ar])  # partner view of the same image
    valid = torch.ones(2 * b, 2 * wb, dtype=torch.bool, device=z1.device)
    valid[torch.arange(2 * b, device=z1.device), self_col] = False
    col_ids = torch.cat([ids_all, ids_all])
    with _stage(parts, "assign"):
        student_sims = rows @ cols.T
        teacher_sims = student_sims.detach() if method.needs_teacher_sims else None
        sims = Sims(student_sims, teacher_sims, pos, valid, torch.cat([batch.index, batch.index]), col_ids)
        target = method.assign(sims, sc)
        loss = soft_cross_entropy(student_sims / method.tau, target.prob, target.valid)
    logs = {"pos_sim": (z1 * z2).sum(1).mean().detach(), "_sims": sims, "_target": target}
    keys = torch.cat([c1, c2]).detach()
    return loss, keys, col_ids, logs


def train_step(parts: StepParts, batch: Batch, sc: dict, step: int) -> dict[str, Tensor]:
    """One optimisation step. sc: this step's scalars (lr, wd, ema, method schedules). Returns device metrics."""
    method = parts.method
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.teacher is not None:
        with _stage(parts, "ema"):
            ema_update(parts.teacher, parts.accelerator.unwrap_model(parts.student).encoder, float(sc["ema"]))
    with _stage(parts, "gather"):
        ids_all = dist.gather(batch.index)  # [WB] global ids, gathered once per step
    if method.inbatch:
        loss, keys, key_ids, logs = inbatch_loss(parts, batch, ids_all, sc)
    else:
        losses, keys_by_view = [], {}  # every key view is enqueued once (sym mode: both global views)
        for qv, kv in method.pairs(len(batch.views)):
            pair_loss, keys_by_view[kv], logs = queue_pair_loss(parts, batch, qv, kv, ids_all, sc, step)
            losses.append(pair_loss)
        loss = torch.stack(losses).mean()
        keys, key_ids = torch.cat(list(keys_by_view.values())), ids_all.repeat(len(keys_by_view))
    with _stage(parts, "backward"):
        parts.accelerator.backward(loss)
    with _stage(parts, "optimizer"):
        # The grad norm doubles as the non-finite check of every gradient (one fused reduction, no sync).
        max_norm = parts.clip_grad if parts.clip_grad > 0 else float("inf")
        grad_norm = parts.accelerator.clip_grad_norm_(parts.student.parameters(), max_norm)
        logs["grad_norm"] = grad_norm.detach() if torch.is_tensor(grad_norm) else torch.tensor(grad_norm)
        logs["nonfinite_loss"], logs["nonfinite_grad"] = ~torch.isfinite(loss.detach()), ~torch.isfinite(logs["grad_norm"])
        if parts.skip_nonfinite and bool(logs["nonfinite_loss"] | logs["nonfinite_grad"]):  # host sync (opt-in)
            parts.optimizer.zero_grad(set_to_none=True)
            logs["skipped"] = torch.ones(())
        else:
            parts.optimizer.step()
            method.after_step(keys, key_ids)
            logs["skipped"] = torch.zeros(())
    if parts.timer is not None:
        parts.timer.step_done()
    logs["loss"] = loss.detach()
    return logs
