"""SANE: self-labeling refinement (SLR) + momentum mixup (MM) (METHODS.md §2).

Columns: gathered batch keys + queue (method.batch_negatives=true, Eq. 4). Per step:
  L_c  = soft CE with one-hot targets (the plain contrastive loss)
  ȳ    = (e_pos + µ·max(p)·p + µ·max(q)·q)/z from the KEY's similarities at temperature τ·τ' (no grad)
  x'_i = θ_i·x_i + (1−θ_i)·x~_π(i)   (query image mixed with the partner's KEY image), θ ~ Beta(κ, κ)
  y'_i = θ_i·ȳ_i + (1−θ_i)·ȳ_π(i);   L_mm = soft CE of the online net's x' against the same columns
  L    = (1−λ)·L_c + λ·L_mm;         µ follows a cosine ramp m1 -> m2 over all steps.
Multi-crop (SANE-Single/Multi): views >= 2 are extra MM resolutions; each is mixed with the partner's crop at
the same resolution and the MM losses are averaged [our choice, METHODS §2.7(4)]; keys stay the view-0 keys.
Random draws (π, θ) come from (seed, step) so a resumed run repeats them exactly. π permutes the LOCAL batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastcl.device import host_to_device
from fastcl.methods.base import ContrastiveMethod, Pair
from fastcl.objectives import slr_target, soft_cross_entropy
from fastcl.rand import seed_for
from fastcl.schedules import cosine_ramp

_SALT = 0x5A4E


@dataclass
class SANEConfig:
    """method.sane"""
    lam: float = 0.5  # weight of the momentum-mixup loss [U: Table 5 best]
    tau_prime: float = 0.8  # SLR sharpening; teacher temperature = tau * tau_prime
    mu_start: float = 0.0  # m1 of the cosine mu schedule
    mu_end: float = 1.0  # m2
    kappa: float = 2.0  # Beta(kappa, kappa) for the mixing coefficient
    per_sample_theta: bool = True  # [U] one theta per query row (False: one per batch)

    @staticmethod
    def checks(c) -> list[tuple[str, bool, str]]:
        return [("lam", 0 <= c.lam <= 1, f"must lie in [0, 1], got {c.lam}"),
                ("tau_prime", c.tau_prime > 0, f"must be > 0, got {c.tau_prime}"),
                ("kappa", c.kappa > 0, f"must be > 0, got {c.kappa}")]


class SANE(ContrastiveMethod):
    section, Config = "sane", SANEConfig
    needs_teacher_sims = True

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict:
        return {"mu": cosine_ramp(self.c.mu_start, self.c.mu_end, total_steps)}

    def pairs(self, n_views: int) -> list[tuple[int, int]]:
        # Views >= 2 feed the mixup only (see module docstring), never the plain contrastive loss.
        return [(1, 0), (0, 1)] if self.layout.symmetric else [(1, 0)]

    def mix_params(self, b: int, step: int, device=None) -> tuple[Tensor, Tensor]:
        """(permutation [b] int64, theta [b] float) for this step, reproducible from (seed, step), on `device`.
        Drawn once per step: the images (student_extras) and the labels (every pair_loss) share the draw."""
        key = (b, step, str(device))
        if getattr(self, "_mix", (None,))[0] != key:
            c = self.c
            rng = np.random.default_rng(seed_for(self.layout.seed, step, _SALT))
            perm = torch.from_numpy(rng.permutation(b))
            theta = rng.beta(c.kappa, c.kappa, size=b if c.per_sample_theta else 1)
            theta = torch.from_numpy(np.broadcast_to(theta, (b,)).astype(np.float32).copy())
            if device is not None:  # pinned + non_blocking on CUDA: no host sync in the step
                perm, theta = host_to_device(perm, torch.device(device)), host_to_device(theta, torch.device(device))
            self._mix = (key, perm, theta)
        return self._mix[1], self._mix[2]

    def student_extras(self, views: tuple[Tensor, ...], step: int) -> list[list[Tensor]]:
        """The mixed images x' (one group each: their own BN statistics, as a separate forward would have).

        Two views: one x' per pair, θ·x_q + (1−θ)·x_k[π]; multi-crop: one per extra view v >= 2, mixed with the
        partner's crop of the same view (shared by every pair)."""
        if self.c.lam == 0:
            return []  # L = L_c exactly
        b = views[0].shape[0]
        perm, theta = self.mix_params(b, step, views[0].device)
        pairs = [(views[q], views[k][perm]) for q, k in self.pairs(len(views))] if len(views) <= 2 else \
            [(views[v], views[v][perm]) for v in range(2, len(views))]
        th = theta.view(-1, 1, 1, 1)
        return [[th.to(xq.dtype) * xq + (1 - th.to(xq.dtype)) * xp] for xq, xp in pairs]

    def pair_loss(self, pair: Pair, extras: list[Tensor], sc: dict, step: int) -> Tensor:
        """(1−λ)·L_c + λ·L_mm, L_mm the soft CE of the mixed images' embeddings against the mixed SLR labels."""
        c = self.c
        if c.lam == 0:
            return pair.loss
        sims = pair.sims
        with torch.no_grad():
            ybar = slr_target(sims.teacher, sims.pos, float(sc["mu"]), self.tau * c.tau_prime,
                                      sims.valid, backend=self.layout.kernel)
        perm, theta = self.mix_params(ybar.shape[0], step, ybar.device)
        valid = sims.valid | sims.valid[perm]
        y_mix = theta[:, None] * ybar + (1 - theta[:, None]) * ybar[perm]
        mine = [extras[pair.index]] if pair.n_views <= 2 else extras  # as built in student_extras
        l_mm = sum(soft_cross_entropy(z @ pair.cols.T / self.tau, y_mix, valid) for z in mine) / len(mine)
        return (1 - c.lam) * pair.loss + c.lam * l_mm
