"""Per-step schedules as arrays, built once (DESIGN.md style rule 5). Length == total steps, asserted."""
from __future__ import annotations

import math

import numpy as np


def cosine_ramp(start: float, end: float, total: int) -> np.ndarray:
    """start + (end - start) * (1 - cos(pi t / T)) / 2 for t = 0..T-1 (EMA momentum, SANE's mu).

    With T-1 in the denominator the last step reaches `end` exactly (METHODS §2.8: mu_T = m2).
    """
    t = np.arange(total, dtype=np.float64)
    frac = t / max(total - 1, 1)
    return start + (end - start) * (1 - np.cos(math.pi * frac)) / 2


def warmup_cosine(peak: float, total: int, warmup: int, floor: float = 0.0) -> np.ndarray:
    """Linear warm-up from 0 over `warmup` steps, then cosine from peak to floor*peak."""
    out = np.empty(total, dtype=np.float64)
    w = min(warmup, total)
    out[:w] = peak * (np.arange(w) + 1) / max(w, 1)
    rest = total - w
    if rest > 0:
        t = np.arange(rest) / max(rest, 1)
        out[w:] = floor * peak + (peak - floor * peak) * (1 + np.cos(math.pi * t)) / 2
    return out


def epoch_cosine(peak: float, epochs: int, warmup: int = 0, floor: float = 0.0) -> np.ndarray:
    """One lr per epoch: linear warm-up over `warmup` epochs, then epoch e (1-based after the warm-up, of E) gets
    floor·peak + (peak - floor·peak)(1 + cos(pi e / E)) / 2, as the MoCo CIFAR demo's adjust_learning_rate, which
    runs before epoch e's first step with e counted from 1 (its log: lr 0.059996 in epoch 1 of 200)."""
    out = np.empty(epochs, dtype=np.float64)
    w = min(warmup, epochs)
    out[:w] = peak * (np.arange(w) + 1) / max(w, 1)
    rest = epochs - w
    if rest > 0:
        e = (np.arange(rest) + 1) / rest
        out[w:] = floor * peak + (peak - floor * peak) * (1 + np.cos(math.pi * e)) / 2
    return out


def build_schedules(cfg, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """lr (batch-scaled), weight decay and EMA momentum for every step of the run."""
    total = cfg.trainer.epochs * steps_per_epoch
    o = cfg.optim
    lr = o.lr * (o.batch_size / o.base_batch if o.base_batch > 0 else 1.0)
    if o.schedule_granularity == "epoch":  # one value per epoch, held for its steps (the MoCo CIFAR demo)
        lrs = np.repeat(epoch_cosine(lr, cfg.trainer.epochs, int(round(o.warmup_epochs)), o.min_lr), steps_per_epoch)
    else:
        lrs = warmup_cosine(lr, total, int(round(o.warmup_epochs * steps_per_epoch)), o.min_lr)
    s = {
        "lr": lrs,
        "wd": np.full(total, o.weight_decay),
        "ema": cosine_ramp(cfg.method.ema, cfg.method.ema_end, total),
    }
    for k, v in s.items():
        assert len(v) == total, (k, len(v), total)
    return s
