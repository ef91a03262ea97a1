"""Torch reference of every kernel: the ground truth the numba CPU and CUDA kernels are tested against.

The reference IS the contract implementation in ``fastcl.objectives.targets`` (one definition of each target, not
a second copy that could drift); this module only names it for the kernel tests, the benchmark and the
``backend="torch"`` dispatch path.
"""
from fastcl.objectives.targets import ifnd_attraction_target, ifnd_valid, sce_target, slr_target

__all__ = ["sce_target", "slr_target", "ifnd_valid", "ifnd_attraction_target"]
