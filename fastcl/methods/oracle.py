"""Oracle assigner: IFND's elimination/attraction driven by the TRUE class labels.

RESEARCH UPPER BOUND - this method READS DATASET LABELS (from the loader's label table), which no real
self-supervised method may do. With mode=elim it is the "false-negative-free" contrastive loss; with
mode=attr it is SupCon's L_out with the positive view included (METHODS.md §3.7).

Degraded oracle (`method.oracle.precision` p < 1, the study's false-negative precision sweep, `--sweep fn-precision`): the detections
(same-class non-positive candidates) are degraded to precision p per row, with random TRUE NEGATIVES as the
false detections. Two degradations, our choice (`method.oracle.degrade`):
  add (default):  recall held fixed at the oracle's (every true false negative stays detected); round(f(1-p)/p)
                  random true negatives are added per row with f true detections, capped at the row's true
                  negatives, so p below the class base rate (~1/C) cannot be reached: the row then loses every
                  negative (and with mode=elim its loss is 0).
  replace:        the number of detections held fixed (the denominator's size is the oracle's): a random
                  fraction 1-p of the true detections is replaced by as many random true negatives, so recall
                  falls to p with precision.
Random draws come from (trainer.seed, step, rank) (the step rides in the step's scalars, `sc["step"]`), so a
resumed run repeats them.
p = 1 is exactly the oracle (no draw).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastcl import dist
from fastcl.methods.base import ContrastiveMethod, Layout, Services, Sims
from fastcl.objectives import Target, label_target, lookup, one_hot_target
from fastcl.objectives.targets import multi_positive_target

_SALT = 0x0AC1E  # stream of the degraded oracle's draws (seed_for)


@dataclass
class OracleConfig:
    """method.oracle"""
    mode: str = "elim"  # elim | attr, driven by TRUE labels (research upper bound; reads labels)
    precision: float = 1.0  # detection precision p in (0, 1]; < 1 degrades the detections (module docstring)
    degrade: str = "add"  # add: recall fixed, false detections added | replace: detection count fixed

    @staticmethod
    def checks(c) -> list[tuple[str, bool, str]]:
        return [("mode", c.mode in ("elim", "attr"), f"{c.mode!r} not in elim|attr"),
                ("precision", 0 < c.precision <= 1, f"a precision in (0, 1], got {c.precision}"),
                ("degrade", c.degrade in ("add", "replace"), f"{c.degrade!r} not in add|replace")]


def _pick(mask: Tensor, count: Tensor, u: Tensor) -> Tensor:
    """count[i] random True entries of each row of mask [B, C] (all when fewer), ranked by uniform u [B, C]."""
    scores = torch.where(mask, u, torch.full_like(u, -1.0))
    order = scores.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(u.shape[1], device=u.device).expand_as(order).contiguous())
    return mask & (rank < count[:, None])


def degrade_detections(detected: Tensor, negatives: Tensor, precision: float, how: str,
                       gen: torch.Generator) -> Tensor:
    """Detections of per-row precision `precision` built from the true ones.

    detected [B, C] bool: the true false negatives (what the oracle detects); negatives [B, C] bool: the true
    negatives among the candidates; how: add | replace (module docstring); gen: the draw's generator (on their device)
    -> [B, C] bool degraded detections.
    """
    f = detected.sum(1)
    n_neg = negatives.sum(1)
    u = torch.rand(detected.shape, generator=gen, device=detected.device)
    if how == "add":
        keep = detected
        n_false = torch.round(f.double() * (1 - precision) / precision).long()
    else:
        n_true = torch.round(f.double() * precision).long()
        keep = _pick(detected, n_true, u)
        n_false = f - n_true
    return keep | _pick(negatives, torch.minimum(n_false, n_neg), u)


class Oracle(ContrastiveMethod):
    section, Config = "oracle", OracleConfig
    follows_base = True
    needs = frozenset({"dataset_labels"})  # true labels: the marked upper bound

    def __init__(self, c: OracleConfig, layout: Layout):
        super().__init__(c, layout)
        self.register_buffer("labels", torch.full((1, layout.num_samples), -1, dtype=torch.long))

    def prepare(self, svc: Services) -> None:
        # THE ONLY METHOD THAT READS DATASET LABELS (research upper bound; the trainer warns).
        if svc.dataset_labels is None:
            raise ValueError("method.name=oracle needs a loader with a label table; this data backend has none")
        self.labels.copy_(torch.as_tensor(svc.dataset_labels(), dtype=torch.long).view(1, -1).to(self.labels.device))

    def assign(self, sims: Sims, sc: dict) -> Target:
        if self.c.precision >= 1:
            return label_target(sims.pos, sims.valid, sims.row_ids, sims.col_ids, self.labels, self.c.mode,
                                self.layout.kernel)
        from fastcl.rand import seed_for

        rows, cols = lookup(self.labels, sims.row_ids)[0], lookup(self.labels, sims.col_ids)[0]
        b = sims.pos.shape[0]
        nonpos = sims.valid.clone()
        nonpos[torch.arange(b, device=nonpos.device), sims.pos] = False
        known = (rows[:, None] >= 0) & (cols[None, :] >= 0) & nonpos
        same = rows[:, None] == cols[None, :]
        # a generator on the candidates' device: the [B, C] draw never crosses from the host
        gen = torch.Generator(device=sims.valid.device)
        gen.manual_seed(seed_for(self.layout.seed, int(sc["step"]), dist.rank(), _SALT))
        det = degrade_detections(known & same, known & ~same, self.c.precision, self.c.degrade, gen)
        if self.c.mode == "elim":
            return one_hot_target(sims.pos, sims.valid.shape[1], sims.valid & ~det)  # the positive is never in det
        pos_mask = det.clone()
        pos_mask[torch.arange(b, device=det.device), sims.pos] = True
        return Target(multi_positive_target(pos_mask, sims.valid), sims.valid)
