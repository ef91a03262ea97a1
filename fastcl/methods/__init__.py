"""Method registry: name -> class (plain dict, DESIGN.md rule 3)."""
from fastcl.methods.base import ContrastiveMethod, Sims
from fastcl.methods.mocov2 import MoCoV2
from fastcl.methods.simclr import SimCLR

METHODS: dict[str, type[ContrastiveMethod]] = {"simclr": SimCLR, "mocov2": MoCoV2}


def build_method(cfg, num_samples: int, dim: int) -> ContrastiveMethod:
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"method.name: {name!r} is not available; registered methods: {sorted(METHODS)}")
    return METHODS[name](cfg, num_samples, dim)


__all__ = ["METHODS", "ContrastiveMethod", "Sims", "build_method"]
