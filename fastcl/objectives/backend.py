"""The label-assignment targets with a `backend` keyword: "torch" runs the reference (`targets.py`, the
default), "numba" and "auto" go through `fastcl.kernels` (numba CPU / numba.cuda by the tensors' device and size),
imported on the first such call only."""
from __future__ import annotations

import functools

from fastcl.objectives import targets as _targets

KERNEL_TARGETS = ("sce_target", "slr_target", "ifnd_valid", "ifnd_attraction_target")


def _with_backend(name: str):
    ref = getattr(_targets, name)

    @functools.wraps(ref)
    def call(*args, backend: str = "torch", **kwargs):
        if backend == "torch":
            return ref(*args, **kwargs)
        from fastcl import kernels  # numba (and numba.cuda for CUDA tensors) only from here
        return getattr(kernels, name)(*args, backend=backend, **kwargs)
    return call


sce_target = _with_backend("sce_target")
slr_target = _with_backend("slr_target")
ifnd_valid = _with_backend("ifnd_valid")
ifnd_attraction_target = _with_backend("ifnd_attraction_target")
