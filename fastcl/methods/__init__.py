"""Method registry: name -> "module:Class" (plain dict, DESIGN.md rule 3).

Entries are resolved on use so that one method's optional dependency (faiss for IFND/SePP) never breaks
another method's import.
"""
from __future__ import annotations

import importlib

from fastcl.methods.base import ContrastiveMethod, Sims

METHODS: dict[str, str] = {
    "simclr": "fastcl.methods.simclr:SimCLR",
    "mocov2": "fastcl.methods.mocov2:MoCoV2",
    "sce": "fastcl.methods.sce:SCE",
    "ifnd": "fastcl.methods.ifnd:IFND",
    "sepp": "fastcl.methods.sepp:SePP",
    "sane": "fastcl.methods.sane:SANE",
    "oracle": "fastcl.methods.oracle:Oracle",
}


def method_class(name: str) -> type[ContrastiveMethod]:
    if name not in METHODS:
        raise ValueError(f"method.name: {name!r} is not available; registered methods: {sorted(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(cfg, num_samples: int, dim: int) -> ContrastiveMethod:
    return method_class(cfg.method.name)(cfg, num_samples, dim)


__all__ = ["METHODS", "ContrastiveMethod", "Sims", "build_method", "method_class"]
