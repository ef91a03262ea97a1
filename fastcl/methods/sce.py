"""SCE: Similarity Contrastive Estimation (METHODS.md §5).

Target per query row: λ·e_pos + (1−λ)·softmax_{j≠pos}(k·cols / τ_m), the teacher's similarities of the
key to the other candidates, sharpened (τ_m < τ). Exact self-exclusion by default; `sce.self_logit_compat`
reproduces the official code (positive column gets teacher logit 0). Candidates: queue only
(`method.batch_negatives=false`, the official configs) or gathered batch keys + queue. Asymmetric (view 0 =
weak target view, view 1 = strong online view) or symmetric with multi-crop queries (see base.pairs).
"""
from __future__ import annotations

from dataclasses import dataclass

from fastcl.methods.base import ContrastiveMethod, Sims
from fastcl.objectives import Target, sce_target


@dataclass
class SCEConfig:
    """method.sce"""
    lam: float = 0.5  # weight of the one-hot (InfoNCE) part
    tau_m: float = 0.05  # teacher (target) temperature
    self_logit_compat: bool = False  # official-code mode: positive column gets teacher logit 0 instead of -inf

    @staticmethod
    def checks(c) -> list[tuple[str, bool, str]]:
        return [("tau_m", c.tau_m > 0, f"temperature must be > 0, got {c.tau_m}"),
                ("lam", 0 <= c.lam <= 1, f"must lie in [0, 1], got {c.lam}")]


class SCE(ContrastiveMethod):
    section, Config = "sce", SCEConfig
    needs_teacher_sims = True

    def assign(self, sims: Sims, sc: dict) -> Target:
        c = self.c
        prob = sce_target(sims.teacher, sims.pos, c.lam, c.tau_m, sims.valid,
                                  self_logit=0.0 if c.self_logit_compat else None, backend=self.layout.kernel)
        return Target(prob, sims.valid)
