"""Oracle assigner: IFND's elimination/attraction driven by the TRUE class labels.

RESEARCH UPPER BOUND - this method READS DATASET LABELS (from the loader's label table), which no real
self-supervised method may do. With mode=elim it is the "false-negative-free" contrastive loss; with
mode=attr it is SupCon's L_out with the positive view included (METHODS.md §3.7).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastcl.methods.base import ContrastiveMethod, Layout, Sims
from fastcl.methods.ifnd import label_target
from fastcl.objectives import Target


@dataclass
class OracleConfig:
    """method.oracle"""
    mode: str = "elim"  # elim | attr, driven by TRUE labels (research upper bound; reads labels)

    @staticmethod
    def checks(c) -> list[tuple[str, bool, str]]:
        return [("mode", c.mode in ("elim", "attr"), f"{c.mode!r} not in elim|attr")]


class Oracle(ContrastiveMethod):
    section, Config = "oracle", OracleConfig
    follows_base = True

    def __init__(self, c: OracleConfig, layout: Layout):
        super().__init__(c, layout)
        self.register_buffer("labels", torch.full((1, layout.num_samples), -1, dtype=torch.long))

    def prepare(self, parts, loader) -> None:
        # THE ONLY METHOD THAT READS DATASET LABELS (research upper bound; the trainer warns).
        if not hasattr(loader, "labels"):
            raise ValueError(f"method.name=oracle needs a loader with a label table; {type(loader).__name__} has none")
        self.labels.copy_(torch.as_tensor(loader.labels, dtype=torch.long).view(1, -1).to(self.labels.device))

    def assign(self, sims: Sims, sc: dict) -> Target:
        return label_target(sims, self.labels, self.c.mode, self.layout.kernel)
