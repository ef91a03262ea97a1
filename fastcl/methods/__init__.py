"""Method registry: a plain dict of classes (DESIGN.md rule 3; go-to-definition works).

Adding a method touches its file (the class, its `Config` section and that section's checks), its YAML under
configs/method/ and one line here.
"""
from __future__ import annotations

from fastcl.methods.base import ContrastiveMethod, Layout, Pair, Sims
from fastcl.methods.dcl import DCL
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
    "dcl": DCL,
}


def method_class(name: str) -> type[ContrastiveMethod]:
    if name not in METHODS:
        raise ValueError(f"method.name: {name!r} is not available; registered methods: {sorted(METHODS)}")
    return METHODS[name]


def build_layout(cfg, num_samples: int) -> Layout:
    """The Layout of cfg's method (shared keys of `method.*`, the embedding size and the run's seed)."""
    m, cls = cfg.method, method_class(cfg.method.name)
    inbatch = cls.inbatch_only or (cls.follows_base and m.base == "simclr")
    return Layout(inbatch=inbatch, batch_negatives=m.batch_negatives, queue_size=0 if inbatch else m.queue_size,
                  symmetric=m.symmetric, tau=m.tau, kernel=m.kernel, num_samples=num_samples,
                  dim=cfg.model.proj_dim, seed=cfg.trainer.seed)


def build_method(cfg, num_samples: int) -> ContrastiveMethod:
    """The method of cfg.method.name, given ONLY its own section and the Layout (never the global config)."""
    cls = method_class(cfg.method.name)
    section = cfg.method[cls.section] if cls.Config is not None else None
    return cls(section, build_layout(cfg, num_samples))


__all__ = ["METHODS", "ContrastiveMethod", "Layout", "Pair", "Sims", "build_layout", "build_method", "method_class"]
