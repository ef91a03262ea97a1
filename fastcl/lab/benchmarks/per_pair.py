"""The step as fastcl computed it before the encode-once engine: every (query, key) pair encoded its own views.

Kept ONLY as the "before" of `python -m fastcl.bench step --compare-per-pair` (the same losses, the FLOPs and
activations of one forward per pair): a symmetric 2+4 multi-crop step makes 10 student and 10 teacher forwards
here against 1 + 1 module calls (6 + 2 images per sample) in fastcl/step.py. Not used for training.
"""
from __future__ import annotations

import torch

from fastcl import dist
from fastcl.methods.base import Pair, Sims
from fastcl.objectives import soft_cross_entropy
from fastcl.pipelines.batch import Batch
from fastcl.step import StepParts, _autocast, _unit, candidates, encode_keys, inbatch_losses
from fastcl.models import ema_update


def per_pair_step(parts: StepParts, batch: Batch, sc: dict, step: int) -> torch.Tensor:
    """One optimisation step, encoding per pair. Returns the loss."""
    method, views = parts.method, batch.views
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.teacher is not None:
        ema_update(parts.teacher, parts.accelerator.unwrap_model(parts.student).encoder, float(sc["ema"]))
    ids_all = dist.gather(batch.index)
    if method.inbatch:  # SimCLR was already one forward over both views
        loss, keys, key_ids, _ = inbatch_losses(parts, batch, ids_all, sc, step)
    else:
        pairs, extras = method.pairs(len(views)), method.student_extras(views, step)
        b, r = views[0].shape[0], dist.rank()
        pos = r * b + torch.arange(b, device=views[0].device)
        losses, keys_by_view = [], {}
        for i, (qv, kv) in enumerate(pairs):
            with _autocast(views[0].device, parts.precision):
                q = _unit(parts.student([[views[qv]]])[0])  # a student forward per pair
                # and per pair for SANE's mixed images (two views: only this pair's own, at its position)
                mine = range(len(extras)) if len(views) > 2 else [i] if extras else []
                z_extra = [_unit(parts.student([extras[j]])[0]) if j in mine else None for j in range(len(extras))]
            (k,), (k_all,) = encode_keys(parts, [[views[kv]]], step)  # a teacher forward per pair
            cols, col_ids, valid = candidates(method, k_all, ids_all, pos)
            sims = Sims(q @ cols.T, k @ cols.T if method.needs_teacher_sims else None, pos, valid, batch.index,
                        col_ids)
            target = method.assign(sims, sc)
            ce = soft_cross_entropy(sims.student / method.tau, target.prob, target.valid)
            losses.append(method.pair_loss(Pair(i, len(views), qv, kv, sims, cols, target, ce), z_extra, sc, step))
            keys_by_view[kv] = k_all
        loss = torch.stack(losses).mean()
        keys, key_ids = torch.cat(list(keys_by_view.values())), ids_all.repeat(len(keys_by_view))
    parts.accelerator.backward(loss)
    parts.optimizer.step()
    method.after_step(keys, key_ids)
    return loss.detach()
