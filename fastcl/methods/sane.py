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

from fastcl import kernels
from fastcl.methods.base import ContrastiveMethod
from fastcl.objectives import soft_cross_entropy
from fastcl.pipelines.augment import seed_for
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
        c = self.cfg.method.sane
        return {"mu": cosine_ramp(c.mu_start, c.mu_end, total_steps)}

    def pairs(self, n_views: int) -> list[tuple[int, int]]:
        # Views >= 2 feed the mixup only (see module docstring), never the plain contrastive loss.
        return [(1, 0), (0, 1)] if self.cfg.method.symmetric else [(1, 0)]

    def mix_params(self, b: int, step: int) -> tuple[Tensor, Tensor]:
        """(permutation [b] int64, theta [b] float) for this step, reproducible from (seed, step)."""
        c = self.cfg.method.sane
        rng = np.random.default_rng(seed_for(self.cfg.trainer.seed, step, _SALT))
        perm = torch.from_numpy(rng.permutation(b))
        theta = rng.beta(c.kappa, c.kappa, size=b if c.per_sample_theta else 1)
        theta = torch.from_numpy(np.broadcast_to(theta, (b,)).astype(np.float32).copy())
        return perm, theta

    def extra_loss(self, ctx: dict) -> Tensor | None:
        c = self.cfg.method.sane
        if c.lam == 0:
            return None  # L = L_c exactly
        from fastcl.step import _embed  # the step's embedding path (autocast, channels_last, fp32 normalise)

        parts, batch, sims, qv, kv = ctx["parts"], ctx["batch"], ctx["sims"], ctx["qv"], ctx["kv"]
        with torch.no_grad():
            ybar = kernels.slr_target(sims.teacher, sims.pos, float(ctx["sc"]["mu"]), self.tau * c.tau_prime,
                                      sims.valid, backend=self.cfg.method.kernel)
        b = ybar.shape[0]
        perm, theta = self.mix_params(b, ctx["step"])
        perm, theta = perm.to(ybar.device), theta.to(ybar.device)
        valid = sims.valid | sims.valid[perm]
        y_mix = theta[:, None] * ybar + (1 - theta[:, None]) * ybar[perm]
        views = batch.views
        # (query image, partner image) per MM resolution: the plain pair, or each extra multi-crop view
        pairs = [(views[qv], views[kv][perm])] if len(views) <= 2 else [(views[v], views[v][perm])
                                                                        for v in range(2, len(views))]
        l_mm = 0.0
        for xq, xp in pairs:
            th = theta.view(-1, 1, 1, 1).to(xq.dtype)
            z = _embed(parts.student, th * xq + (1 - th) * xp, parts)  # second forward of the online net
            l_mm = l_mm + soft_cross_entropy(z @ ctx["cols"].T / self.tau, y_mix, valid)
        return (1 - c.lam) * ctx["base_loss"] + c.lam * l_mm / len(pairs)
