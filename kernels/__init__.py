"""Fast label-assignment kernels (installed as ``fastcl.kernels``), dispatching to numba CPU / numba.cuda / torch.

Same signatures as the contract functions in ``fastcl.objectives`` plus a keyword ``backend``:

* ``"torch"``: the reference (``fastcl.kernels.reference`` = ``fastcl.objectives.targets``), any device.
* ``"numba"``: ``fastcl.kernels.cuda`` for CUDA tensors, ``fastcl.kernels.cpu`` for CPU tensors (raises if the
  tensor's device has no numba kernel, e.g. CUDA tensors without a usable ``numba.cuda``).
* ``"auto"`` (default): the CUDA kernel for CUDA tensors when ``numba.cuda`` is usable (a probe kernel compiles and
  runs once per process; otherwise one warning and torch); the numba CPU kernel
  for CPU tensors of at least ``NUMBA_CPU_MIN_ELEMENTS`` entries (below that the first call's cache load and the
  thread-pool launch cost more than torch spends); torch otherwise (no numba, other devices, small inputs).

``numba.cuda`` is imported only when a CUDA tensor arrives, so the CPU path never touches it (and
``NUMBA_ENABLE_CUDASIM`` set in one test process cannot leak into another).
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from types import ModuleType

from torch import Tensor

from fastcl.kernels import reference

__all__ = ["sce_target", "slr_target", "ifnd_valid", "ifnd_attraction_target", "choose_backend",
           "NUMBA_CPU_MIN_ELEMENTS", "BACKENDS", "describe"]

BACKENDS = ("auto", "torch", "numba")
# 256 x 1,024. Below it numba's fixed costs win over its speed: ~0.1 ms per call (argument conversion, type
# dispatch, thread-pool launch) and ~0.3 s once per process to load the cached machine code (15-40 s to compile it
# the first time after an install or an edit). Measured on the 2-core machine, one thread each, SCE target:
# 256 x 1,024 torch 0.30 ms vs numba 0.24 ms; 32 x 1,024 0.05 vs 0.04 ms (docs/BENCHMARKS.md "Kernels").
# Tiny CPU test configs therefore stay on torch and never pay the load/compile.
NUMBA_CPU_MIN_ELEMENTS = 1 << 18


@functools.lru_cache(maxsize=None)
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def _compile_probe() -> None:
    """Compile and run a one-line numba.cuda kernel (fastcl.kernels.cuda.probe). `cuda.is_available()` alone says
    nothing of libNVVM or of a PTX newer than the driver: those fail at the first compile, which would otherwise be
    the first training step."""
    from fastcl.kernels import cuda as cuda_kernels
    cuda_kernels.probe()


@functools.lru_cache(maxsize=None)
def _cuda_usable() -> bool:
    """numba.cuda importable, a CUDA device visible to it, and a probe kernel compiles and runs (once per process,
    on the first CUDA tensor). Otherwise the kernels fall back to torch, said in one line."""
    if not _numba_installed():
        return False
    try:
        from numba import cuda
        if not cuda.is_available():
            return False
        _compile_probe()
    except Exception as e:  # numba-cuda missing, libNVVM missing, PTX too new for the driver, broken bindings
        warnings.warn(f"numba.cuda is not usable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                      f"the label-assignment target kernels run on torch instead", RuntimeWarning, stacklevel=2)
        return False
    return True


def describe(backend: str, device) -> str:
    """One line: which implementation `backend` (method.kernel) runs for tensors on `device`."""
    dev = getattr(device, "type", str(device))
    if backend == "torch" or not _numba_installed():
        return "torch"
    if dev == "cuda":
        return "numba.cuda" if _cuda_usable() else "torch (numba.cuda not usable)"
    if dev == "cpu":
        return "numba njit" if backend == "numba" else f"numba njit from {NUMBA_CPU_MIN_ELEMENTS} entries, torch below"
    return "torch"


def choose_backend(backend: str, t: Tensor) -> str:
    """Resolve ``backend`` for tensor ``t`` to one of "torch", "cpu" (numba njit), "cuda" (numba.cuda)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    dev = t.device.type
    if backend == "numba":
        if dev == "cuda":
            if not _cuda_usable():
                raise RuntimeError("backend='numba' on a CUDA tensor needs numba-cuda with a visible GPU")
            return "cuda"
        if dev == "cpu":
            if not _numba_installed():
                raise RuntimeError("backend='numba' needs numba installed")
            return "cpu"
        raise RuntimeError(f"backend='numba' has no kernel for device {dev!r}")
    if dev == "cuda":
        return "cuda" if _cuda_usable() else "torch"
    if dev == "cpu" and _numba_installed() and t.numel() >= NUMBA_CPU_MIN_ELEMENTS:
        return "cpu"
    return "torch"


def _impl(kind: str) -> ModuleType:
    if kind == "cuda":
        from fastcl.kernels import cuda
        return cuda
    if kind == "cpu":
        from fastcl.kernels import cpu
        return cpu
    return reference


def sce_target(teacher_sims: Tensor, pos: Tensor, lam: float | Tensor, tau_m: float | Tensor,
               valid: Tensor | None = None, *, self_logit: float | None = None, backend: str = "auto") -> Tensor:
    """SCE target [B, C] fp32 (see ``fastcl.objectives.targets.sce_target``) on the chosen backend."""
    impl = _impl(choose_backend(backend, teacher_sims))
    return impl.sce_target(teacher_sims, pos, lam, tau_m, valid, self_logit=self_logit)


def slr_target(teacher_sims: Tensor, pos: Tensor, mu: float | Tensor, temperature: float | Tensor,
               valid: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """SLR refined label [B, C] fp32 (see ``fastcl.objectives.targets.slr_target``) on the chosen backend."""
    impl = _impl(choose_backend(backend, teacher_sims))
    return impl.slr_target(teacher_sims, pos, mu, temperature, valid)


def _label_backend(backend: str, pos: Tensor, row_labels: Tensor, col_labels: Tensor) -> str:
    # The decision needs a [B, C]-sized tensor: describe the mask by a zero-stride view of that shape.
    shape_proxy = col_labels.new_empty(()).expand(row_labels.shape[-1], col_labels.shape[-1])
    return choose_backend(backend, shape_proxy)


def ifnd_valid(pos: Tensor, row_labels: Tensor, col_labels: Tensor, valid: Tensor | None = None, *,
               backend: str = "auto") -> Tensor:
    """IFND elimination mask [B, C] bool (see ``fastcl.objectives.targets.ifnd_valid``) on the chosen backend."""
    impl = _impl(_label_backend(backend, pos, row_labels, col_labels))
    return impl.ifnd_valid(pos, row_labels, col_labels, valid)


def ifnd_attraction_target(pos: Tensor, row_labels: Tensor, col_labels: Tensor, valid: Tensor | None = None, *,
                           backend: str = "auto") -> Tensor:
    """IFND attraction target [B, C] fp32 (see ``fastcl.objectives.targets``) on the chosen backend."""
    impl = _impl(_label_backend(backend, pos, row_labels, col_labels))
    return impl.ifnd_attraction_target(pos, row_labels, col_labels, valid)
