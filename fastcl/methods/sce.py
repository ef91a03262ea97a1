"""SCE: Similarity Contrastive Estimation (METHODS.md §5).

Target per query row: λ·e_pos + (1−λ)·softmax_{j≠pos}(k·cols / τ_m), the teacher's similarities of the
key to the other candidates, sharpened (τ_m < τ). Exact self-exclusion by default; `sce.self_logit_compat`
reproduces the official code (positive column gets teacher logit 0). Candidates: queue only
(`method.batch_negatives=false`, the official configs) or gathered batch keys + queue. Asymmetric (view 0 =
weak target view, view 1 = strong online view) or symmetric with multi-crop queries (see base.pairs).
"""
from __future__ import annotations

from fastcl import kernels
from fastcl.methods.base import ContrastiveMethod, Sims
from fastcl.objectives import Target


class SCE(ContrastiveMethod):
    needs_teacher_sims = True

    def assign(self, sims: Sims, sc: dict) -> Target:
        c = self.cfg.method.sce
        prob = kernels.sce_target(sims.teacher, sims.pos, c.lam, c.tau_m, sims.valid,
                                  self_logit=0.0 if c.self_logit_compat else None, backend=self.cfg.method.kernel)
        return Target(prob, sims.valid)
