"""One training step, readable top to bottom (docs/DESIGN.md, "One training step").

    pairs  = method.pairs(n_views)                  # (query view, key view) terms of the loss
    z      = student(query views grouped by resolution + method extras)   # ONE module call per step
    k      = teacher(key views)                     # ONE call, no grad, ShuffleBN per model.shuffle_bn
    k_all  = keys of every rank (gathered once per key view); ids_all gathered once
    for each key view:  sims over [k_all ; queue], target = method.assign(...)    # once per KEY view
    for each pair:      soft CE of q·cols/τ against that target -> method.pair_loss (SANE adds its mixup)
    loss = mean over pairs -> backward -> step -> method.after_step(keys, ids): queue push / table update

Every view is encoded exactly once per step (student: the query views; teacher: the key views), so DDP sees
one student forward per backward for every method and config (DINO's multi-crop wrapper pattern), and
activations are kept once per view, not once per pair. No host sync happens here: the returned metrics are
device tensors, read by the trainer every `trainer.log_every` steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import dist
from fastcl.device import host_to_device
from fastcl.methods.base import ContrastiveMethod, Pair, Services, Sims
from fastcl.models import ema_update
from fastcl.objectives import soft_cross_entropy
from fastcl.pipelines.batch import Batch
from fastcl.timing import StageTimer

_SHUFFLE_SALT = 0x5B4E


_COUNTS: dict | None = None  # set by count_forwards(): images and forwards per network, for benchmarks and tests


@contextlib.contextmanager
def count_forwards():
    """While active, count what goes through forward_group: yields {"student": images, "teacher": images,
    "student_forwards": n, "teacher_forwards": n} (`python -m fastcl.bench step`, tests/test_exp_configs.py)."""
    global _COUNTS
    _COUNTS = {"student": 0, "teacher": 0, "student_forwards": 0, "teacher_forwards": 0}
    try:
        yield _COUNTS
    finally:
        _COUNTS = None


def forward_group(net: nn.Module, xs: list[Tensor], bn_splits: int = 1, channels_last: bool = False,
                  who: str = "student") -> list[Tensor]:
    """ONE forward of `net` (the `who` network: student | teacher) over same-size image batches xs[i]
    [B, 3, H, W]; returns [B, D] per input.

    With split BN (bn_splits = S > 1) the rows are reordered so that SplitBatchNorm's group s (rows ≡ s mod S)
    holds the s-th B/S rows of EVERY input, which is what GPU s would hold when each GPU concatenates its own
    views, and the embeddings are put back in input order after.
    """
    v, b = len(xs), xs[0].shape[0]
    if _COUNTS is not None:
        _COUNTS[who] += v * b
        _COUNTS[who + "_forwards"] += 1
    x = torch.cat(xs) if v > 1 else xs[0]
    s = bn_splits
    if s > 1:  # row (input i, slice j, position t) -> row (i·B/S + t)·S + j
        x = x.reshape(v, s, b // s, *x.shape[1:]).transpose(1, 2).reshape(v * b, *x.shape[1:])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    z = net(x)
    if s > 1:
        z = z.view(v, b // s, s, -1).transpose(1, 2).reshape(v * b, -1)
    return list(z.split(b))


class Student(nn.Module):
    """The online network: encoder (backbone + projector) followed by the predictor (Identity if none).

    forward(groups): each group is a list of same-size image batches run as one forward (its BN statistics
    cover the group); returns the raw embeddings of every input, in order. The step calls it ONCE per step.
    """

    def __init__(self, encoder: nn.Module, predictor: nn.Module, bn_splits: int = 1, channels_last: bool = False):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.bn_splits = bn_splits
        self.channels_last = channels_last

    def embed(self, x: Tensor) -> Tensor:
        return self.predictor(self.encoder(x))

    def forward(self, groups: list[list[Tensor]]) -> list[Tensor]:
        out = []
        for g in groups:
            out += forward_group(self.embed, g, self.bn_splits, self.channels_last)
        return out


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
    shuffle_bn: str = "off"  # key encoder BN: off | shuffle | sync (model.shuffle_bn)
    bn_splits: int = 1  # BN slices per process (model.bn_splits)
    seed: int = 0  # trainer.seed: the ShuffleBN permutation is a function of (seed, step)
    services: Services | None = None  # what the method was lent outside the step (methods/base.py)


def _stage(parts: StepParts, name: str):
    return parts.timer(name) if parts.timer is not None else contextlib.nullcontext()


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _unit(z: Tensor) -> Tensor:
    """L2-normalised fp32 embedding (normalise in fp32: cosines feed temperatures as low as 0.05)."""
    return F.normalize(z.float(), dim=1)


def shuffle_perm(seed: int, step: int, n: int, device) -> Tensor:
    """ShuffleBN's permutation of the n = W·B global key images at `step`: a function of (seed, step) only, so
    every rank draws the same one without a broadcast, and a resumed run repeats it."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 2 + _SHUFFLE_SALT)
    return host_to_device(torch.randperm(n, generator=g), torch.device(device))  # no sync on CUDA


@torch.no_grad()
def encode_keys(parts: StepParts, groups: list[list[Tensor]], step: int) -> tuple[list[Tensor], list[Tensor]]:
    """Teacher embeddings of the key views, ONE teacher call per size group (key views are global crops: one
    group in every shipped recipe). Returns (own rows [B, D], all ranks' rows [WB, D]) per view, in order.

    model.shuffle_bn=shuffle (MoCo `_batch_shuffle_ddp`): the W·B key images are permuted across ranks (and, in
    one process, across the bn_splits BN slices), encoded, and put back, so the BN statistics a key is
    normalised with never come from the slice its query was normalised with. off / sync: encoded in place (sync:
    the teacher's BN layers are global).
    """
    teacher, w, r = parts.teacher, dist.world_size(), dist.rank()
    b, dev = groups[0][0].shape[0], groups[0][0].device
    shuffle = parts.shuffle_bn == "shuffle" and (w > 1 or parts.bn_splits > 1)
    perm = shuffle_perm(parts.seed, step, w * b, dev) if shuffle else None
    k = []
    with _autocast(dev, parts.precision):
        for g in groups:
            if shuffle:
                mine = perm[r * b:(r + 1) * b]
                g = [dist.gather(x)[mine] for x in g]
            k += [_unit(t) for t in forward_group(teacher, g, parts.bn_splits, parts.channels_last, "teacher")]
    if not shuffle:
        return k, [dist.gather(t) for t in k]
    k_all = []
    for t in k:
        shuffled = dist.gather(t)  # [WB, D], row j = key of image perm[j]
        k_all.append(torch.empty_like(shuffled).index_copy_(0, perm, shuffled))
    return [t[r * b:(r + 1) * b] for t in k_all], k_all


def _groups(views: tuple[Tensor, ...], which: list[int]) -> list[list[int]]:
    """Indices of `which` grouped by image size, consecutive views of one size forming one group."""
    groups: list[list[int]] = []
    for v in which:
        if groups and views[groups[-1][-1]].shape == views[v].shape:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


def encode_student(parts: StepParts, views: tuple[Tensor, ...], which: list[int],
                   extras: list[list[Tensor]]) -> tuple[dict[int, Tensor], list[Tensor]]:
    """ONE student call: the views `which` grouped by size, then the method's extra groups. Returns the unit
    embeddings {view: [B, D]} and the extras' [B, D] list."""
    groups = _groups(views, which)
    with _autocast(views[0].device, parts.precision):
        z = parts.student([[views[v] for v in g] for g in groups] + extras)
    z = [_unit(t) for t in z]
    flat = [v for g in groups for v in g]
    return dict(zip(flat, z[:len(flat)])), z[len(flat):]


def candidates(method: ContrastiveMethod, k_all: Tensor, ids_all: Tensor, pos: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
    """MoCo layout of one key view: cols [C, D] = [gathered keys k_all [WB, D] ; queue], their ids [C] and the
    candidate mask [B, C] of the rows whose positives are the columns `pos` [B]."""
    cols, col_ids = k_all, ids_all
    if method.queue is not None:  # the queue as it was BEFORE this step's push (after_step)
        cols = torch.cat([k_all, method.queue.keys.to(k_all.dtype)])
        col_ids = torch.cat([ids_all, method.queue.ids])
    b = pos.shape[0]
    valid = (col_ids >= 0).unsqueeze(0).expand(b, -1).clone()  # empty queue slots are not candidates
    if not method.layout.batch_negatives:
        valid[:, :k_all.shape[0]] = False  # MoCo: only the own key among the batch keys
    valid[torch.arange(b, device=pos.device), pos] = True
    return cols, col_ids, valid


def queue_losses(parts: StepParts, batch: Batch, ids_all: Tensor, sc: dict, step: int):
    """MoCo layout. Returns (loss, keys [nK·WB, D] and ids to push, logs)."""
    method, views = parts.method, batch.views
    pairs = method.pairs(len(views))
    key_views = sorted({kv for _, kv in pairs})
    with _stage(parts, "forward"):
        q, extras = encode_student(parts, views, sorted({qv for qv, _ in pairs}),
                                   method.student_extras(views, step))
        key_groups = _groups(views, key_views)
        k, k_all = encode_keys(parts, [[views[v] for v in g] for g in key_groups], step)
    key_order = [v for g in key_groups for v in g]
    k, k_all = dict(zip(key_order, k)), dict(zip(key_order, k_all))
    b, r = views[0].shape[0], dist.rank()
    dev = views[0].device
    rows = torch.arange(b, device=dev)
    pos = r * b + rows  # own key's column in the gathered batch
    per_key = {}
    with _stage(parts, "assign"):
        for kv in key_views:  # candidate layout, teacher sims and target: once per KEY view
            cols, col_ids, valid = candidates(method, k_all[kv], ids_all, pos)
            teacher_sims = k[kv] @ cols.T if method.needs_teacher_sims else None
            proto = Sims(None, teacher_sims, pos, valid, batch.index, col_ids)  # student sims: per pair
            per_key[kv] = (cols, proto, method.assign(proto, sc))
        losses = []
        for i, (qv, kv) in enumerate(pairs):
            cols, proto, target = per_key[kv]
            student_sims = q[qv] @ cols.T  # [B, C]
            sims = Sims(student_sims, proto.teacher, pos, proto.valid, batch.index, proto.col_ids)
            ce = soft_cross_entropy(student_sims / method.tau, target.prob, target.valid)
            losses.append(method.pair_loss(Pair(i, len(views), qv, kv, sims, cols, target, ce), extras, sc, step))
    loss = torch.stack(losses).mean()
    qv, kv = pairs[-1]
    # the last pair's layout and target stay available to the trainer's diagnostics (read at log steps only)
    logs = {"pos_sim": (q[qv] * k[kv]).sum(1).mean().detach(), "_sims": sims, "_target": target}
    keys = torch.cat([k_all[v] for v in key_views])  # every key view is enqueued once (sym: both)
    return loss, keys, ids_all.repeat(len(key_views)), logs


def inbatch_losses(parts: StepParts, batch: Batch, ids_all: Tensor, sc: dict, step: int):
    """SimCLR layout: rows = this rank's 2B views, columns = all 2WB gathered views (with gradient)."""
    method, views = parts.method, batch.views
    b, r = views[0].shape[0], dist.rank()
    # One forward over both views (as SimCLR does): BN statistics over the 2B images.
    with _stage(parts, "forward"):
        z, _ = encode_student(parts, views, [0, 1], [])
        z1, z2 = z[0], z[1]
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
        loss = method.pair_loss(Pair(0, len(views), 0, 1, sims, cols.detach(), target, loss), [], sc, step)
    logs = {"pos_sim": (z1 * z2).sum(1).mean().detach(), "_sims": sims, "_target": target}
    return loss, cols.detach(), col_ids, logs


def train_step(parts: StepParts, batch: Batch, sc: dict, step: int) -> dict[str, Tensor]:
    """One optimisation step. sc: this step's scalars (lr, wd, ema, method schedules). Returns device metrics."""
    sc = {**sc, "step": step}  # the step index travels with the scalars (assign() draws seeded by it)
    method = parts.method
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.teacher is not None:
        with _stage(parts, "ema"):
            ema_update(parts.teacher, parts.accelerator.unwrap_model(parts.student).encoder, float(sc["ema"]))
    with _stage(parts, "gather"):
        ids_all = dist.gather(batch.index)  # [WB] global ids, gathered once per step
    losses = inbatch_losses if method.inbatch else queue_losses
    loss, keys, key_ids, logs = losses(parts, batch, ids_all, sc, step)
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
