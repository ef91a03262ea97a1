"""Method registry: a plain dict of classes (DESIGN.md rule 3; go-to-definition works).

Adding a method touches its file (the class, its `Config` section and that section's checks), its YAML under
configs/method/ and one line here.
"""
from __future__ import annotations

from fastcl.methods.base import ContrastiveMethod, Sims
from fastcl.methods.ifnd import IFND
from fastcl.methods.mocov2 import MoCoV2
from fastcl.methods.oracle import Oracle
from fastcl.methods.sane import SANE
from fastcl.methods.sce import SCE
from fastcl.methods.sepp import SePP
from fastcl.methods.simclr import SimCLR

METHODS: dict[str, type[ContrastiveMethod]] = {
    "simclr": SimCLR,
    "mocov2": MoCoV2,
    "sce": SCE,
    "ifnd": IFND,
    "sepp": SePP,
    "sane": SANE,
    "oracle": Oracle,
}


def method_class(name: str) -> type[ContrastiveMethod]:
    if name not in METHODS:
        raise ValueError(f"method.name: {name!r} is not available; registered methods: {sorted(METHODS)}")
    return METHODS[name]


def build_method(cfg, num_samples: int, dim: int) -> ContrastiveMethod:
    return method_class(cfg.method.name)(cfg, num_samples, dim)


__all__ = ["METHODS", "ContrastiveMethod", "Sims", "build_method", "method_class"]
