"""numba.cuda kernels for the label-assignment targets, zero-copy on torch CUDA tensors.

Same results as ``fastcl.objectives.targets`` (the ground truth) and the CPU kernels in ``fastcl.kernels.cpu``.
Layout: one thread block per row, threads striding over the columns (coalesced), shared-memory tree reductions
for the row max and row sum. Each row is read twice (max, then exp) and the target written once and rescaled in
place by the thread that wrote it; 256 x 65,536 fp32 is ~200 MB of traffic, tens of microseconds of HBM time.

No host round trip: torch tensors are wrapped with ``numba.cuda.as_cuda_array(t, sync=False)`` (the
``__cuda_array_interface__``, no copy; ``sync=False`` because we launch on the very stream torch is using, so
stream order already protects the data, while the default would synchronise that stream from the host), outputs
are allocated by torch, and kernels are launched on ``torch.cuda.current_stream()`` via
``numba.cuda.external_stream``. Per-row scalars are built on the device (``torch.full``), never read back.

Importing this module imports numba.cuda; ``fastcl.kernels`` imports it lazily, only for CUDA tensors. Under
``NUMBA_ENABLE_CUDASIM=1`` the same kernels run on numba's CPU simulator (tests/_cudasim_worker.py), with the
``launch_*`` functions on ``numba.cuda.to_device`` arrays.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from numba import cuda
from torch import Tensor

__all__ = ["TPB", "probe", "launch_sce", "launch_slr", "launch_ifnd", "launch_attraction",
           "sce_target", "slr_target", "ifnd_valid", "ifnd_attraction_target"]

# Threads per block (a power of two for the tree reductions). 512 on a GPU: 256 rows x 512 threads fills an H100
# (132 SMs x 2,048 threads) about half; each thread handles C/512 = 128 columns of a 65,536-wide row. The
# simulator runs every thread as a Python thread, so it gets 32: same code, a smaller constant.
TPB = 32 if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") else 512

_F = np.float32
_NEG_INF = _F(-np.inf)
_ZERO = _F(0.0)
_ONE = _F(1.0)


@cuda.jit(device=True)
def _block_max(sh, v):
    """Max of v over the block (every thread gets it). sh: shared [TPB] fp32 scratch."""
    t = cuda.threadIdx.x
    sh[t] = v
    cuda.syncthreads()
    w = TPB // 2
    while w > 0:
        if t < w and sh[t + w] > sh[t]:
            sh[t] = sh[t + w]
        cuda.syncthreads()
        w //= 2
    r = sh[0]
    cuda.syncthreads()  # sh is reused by the next reduction
    return r


@cuda.jit(device=True)
def _block_sum(sh, v):
    """Sum of v over the block (every thread gets it). sh: shared [TPB] fp32 scratch."""
    t = cuda.threadIdx.x
    sh[t] = v
    cuda.syncthreads()
    w = TPB // 2
    while w > 0:
        if t < w:
            sh[t] += sh[t + w]
        cuda.syncthreads()
        w //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


@cuda.jit(device=True)
def _rel_max(x, valid, has_valid, i, p, vi):
    """Per-thread max of x[i, j] over this thread's columns that are valid and not the positive p."""
    m = _NEG_INF
    for j in range(cuda.threadIdx.x, x.shape[1], TPB):
        if j != p and (not has_valid or valid[vi, j]):
            v = x[i, j]
            if v > m:
                m = v
    return m


@cuda.jit(device=True)
def _rel_exp(x, valid, has_valid, i, p, vi, tau, shift, out):
    """out[i, j] = exp(x[i, j] / tau - shift) on this thread's valid non-positive columns, 0 elsewhere; returns
    this thread's partial sum."""
    s = _ZERO
    for j in range(cuda.threadIdx.x, x.shape[1], TPB):
        e = _ZERO
        if j != p and (not has_valid or valid[vi, j]):
            e = math.exp(x[i, j] / tau - shift)
        out[i, j] = e
        s += e
    return s


@cuda.jit(cache=True)
def sce_kernel(x, pos, lam, tau_m, valid, has_valid, self_logit, has_self, out):
    """SCE target, one block per row. x, out [B, C] fp32; pos [B] int64; lam, tau_m [B] fp32; valid [B, C] bool
    (or a [1, 1] dummy with has_valid False); self_logit fp32 (compatibility mode when has_self)."""
    sh = cuda.shared.array(TPB, dtype=np.float32)
    i = cuda.blockIdx.x
    p = pos[i]
    vi = i % valid.shape[0]
    tau = tau_m[i]
    m = _block_max(sh, _rel_max(x, valid, has_valid, i, p, vi))
    if m == _NEG_INF and not has_self:  # no relational column: one-hot (uniform across the block, no divergence)
        for j in range(cuda.threadIdx.x, x.shape[1], TPB):
            out[i, j] = _ONE if j == p else _ZERO
        return
    shift = m / tau
    if has_self and self_logit > shift:
        shift = self_logit
    s = _block_sum(sh, _rel_exp(x, valid, has_valid, i, p, vi, tau, shift, out))
    e_self = math.exp(self_logit - shift) if has_self else _ZERO
    lm = lam[i]
    scale = (_ONE - lm) / (s + e_self)
    # Each thread rescales the columns it wrote itself: no barrier needed; the owner of p writes its weight.
    for j in range(cuda.threadIdx.x, x.shape[1], TPB):
        if j == p:
            out[i, j] = lm + e_self * scale
        else:
            out[i, j] = out[i, j] * scale


@cuda.jit(cache=True)
def slr_kernel(x, pos, mu, temperature, valid, has_valid, out):
    """SLR refined label, one block per row (algebra as in ``fastcl.kernels.cpu.slr_kernel``)."""
    sh = cuda.shared.array(TPB, dtype=np.float32)
    i = cuda.blockIdx.x
    p = pos[i]
    vi = i % valid.shape[0]
    tau = temperature[i]
    m = _block_max(sh, _rel_max(x, valid, has_valid, i, p, vi))
    if m == _NEG_INF:  # only the positive is valid: one-hot
        for j in range(cuda.threadIdx.x, x.shape[1], TPB):
            out[i, j] = _ONE if j == p else _ZERO
        return
    m_q = m / tau
    x_pos = x[i, p] / tau
    m_p = m_q if m_q > x_pos else x_pos
    s = _block_sum(sh, _rel_exp(x, valid, has_valid, i, p, vi, tau, m_q, out))
    r = math.exp(m_q - m_p)
    e_pos = math.exp(x_pos - m_p)
    z_p = r * s + e_pos
    mu_i = mu[i]
    wp = mu_i / z_p
    wq = mu_i / s
    inv_z = _ONE / (_ONE + wp + wq)
    coef = (wp * r / z_p + wq / s) * inv_z
    for j in range(cuda.threadIdx.x, x.shape[1], TPB):
        if j == p:
            out[i, j] = (_ONE + wp * e_pos / z_p) * inv_z
        else:
            out[i, j] = out[i, j] * coef


@cuda.jit(device=True)
def _is_fn(row_labels, col_labels, i, j):
    """True if row i and column j share an accepted (>= 0) label at any level."""
    for lev in range(col_labels.shape[0]):
        r = row_labels[lev, i]
        if r >= 0 and col_labels[lev, j] == r:
            return True
    return False


@cuda.jit(cache=True)
def ifnd_kernel(pos, row_labels, col_labels, valid, has_valid, out):
    """IFND elimination mask, one block per row: out[i, j] = valid & ~FN; the positive keeps its valid value."""
    i = cuda.blockIdx.x
    p = pos[i]
    vi = i % valid.shape[0]
    for j in range(cuda.threadIdx.x, col_labels.shape[1], TPB):
        keep = valid[vi, j] if has_valid else True
        if j != p and _is_fn(row_labels, col_labels, i, j):
            keep = False
        out[i, j] = keep


@cuda.jit(cache=True)
def attraction_kernel(pos, row_labels, col_labels, valid, has_valid, out):
    """IFND attraction target, one block per row: uniform over {pos} ∪ valid detected FNs."""
    sh = cuda.shared.array(TPB, dtype=np.float32)
    i = cuda.blockIdx.x
    p = pos[i]
    vi = i % valid.shape[0]
    n = _ZERO
    for j in range(cuda.threadIdx.x, col_labels.shape[1], TPB):
        w = _ZERO
        if j == p:
            w = _ONE
        elif (not has_valid or valid[vi, j]) and _is_fn(row_labels, col_labels, i, j):
            w = _ONE
        out[i, j] = w
        n += w
    inv_n = _ONE / _block_sum(sh, n)
    for j in range(cuda.threadIdx.x, col_labels.shape[1], TPB):
        out[i, j] = out[i, j] * inv_n


# ----------------------------------------------------------------------------------------------------------------
# Launchers on numba device arrays (anything with __cuda_array_interface__); ``stream`` 0 = default stream.

def launch_sce(x, pos, lam, tau_m, valid, has_valid, self_logit, has_self, out, stream=0) -> None:
    sce_kernel[x.shape[0], TPB, stream](x, pos, lam, tau_m, valid, has_valid, np.float32(self_logit), has_self, out)


@cuda.jit
def _add_one(a):
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] += _ONE


def probe() -> None:
    """Compile and run a one-line kernel (fastcl.kernels probes usability with it once per process). Raises when
    numba.cuda cannot compile (libNVVM missing) or run (a PTX newer than the driver) here."""
    d = cuda.to_device(np.zeros(4, dtype=_F))
    _add_one[1, 4](d)
    if not (d.copy_to_host() == _ONE).all():
        raise RuntimeError("the probe kernel computed wrong values")


def launch_slr(x, pos, mu, temperature, valid, has_valid, out, stream=0) -> None:
    slr_kernel[x.shape[0], TPB, stream](x, pos, mu, temperature, valid, has_valid, out)


def launch_ifnd(pos, row_labels, col_labels, valid, has_valid, out, stream=0) -> None:
    ifnd_kernel[row_labels.shape[1], TPB, stream](pos, row_labels, col_labels, valid, has_valid, out)


def launch_attraction(pos, row_labels, col_labels, valid, has_valid, out, stream=0) -> None:
    attraction_kernel[row_labels.shape[1], TPB, stream](pos, row_labels, col_labels, valid, has_valid, out)


# ----------------------------------------------------------------------------------------------------------------
# torch wrappers: CUDA tensors in, CUDA tensors out, everything on torch's current stream.

def _dev(t: Tensor):
    return cuda.as_cuda_array(t, sync=False)  # zero-copy view; see the module docstring for sync=False


def _stream():
    return cuda.external_stream(torch.cuda.current_stream().cuda_stream)


def _rows(x: float | Tensor, b: int, device: torch.device) -> Tensor:
    """Per-row scalar as a [B] fp32 device tensor, built on the device (a float becomes a fill, no copy/sync)."""
    if isinstance(x, Tensor):
        return x.detach().to(device=device, dtype=torch.float32).reshape(-1).expand(b).contiguous()
    return torch.full((b,), float(x), dtype=torch.float32, device=device)


def _valid(valid: Tensor | None, device: torch.device) -> tuple[Tensor, bool]:
    if valid is None:
        return torch.ones(1, 1, dtype=torch.bool, device=device), False  # never read
    return valid.detach().to(device=device, dtype=torch.bool).contiguous(), True


def _labels(labels: Tensor, device: torch.device) -> Tensor:
    labels = labels.detach()
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    return labels.to(device=device, dtype=torch.int64).contiguous()


def sce_target(teacher_sims: Tensor, pos: Tensor, lam: float | Tensor, tau_m: float | Tensor,
               valid: Tensor | None = None, *, self_logit: float | None = None) -> Tensor:
    """CUDA version of ``fastcl.objectives.targets.sce_target``. [B, C] CUDA -> [B, C] fp32 CUDA."""
    x = teacher_sims.detach().to(torch.float32).contiguous()
    b, dev = x.shape[0], x.device
    out = torch.empty_like(x)
    v, has_v = _valid(valid, dev)
    p = pos.detach().to(device=dev, dtype=torch.int64).contiguous()
    lam_, tau_ = _rows(lam, b, dev), _rows(tau_m, b, dev)
    launch_sce(_dev(x), _dev(p), _dev(lam_), _dev(tau_), _dev(v), has_v,
               0.0 if self_logit is None else self_logit, self_logit is not None, _dev(out), _stream())
    return out


def slr_target(teacher_sims: Tensor, pos: Tensor, mu: float | Tensor, temperature: float | Tensor,
               valid: Tensor | None = None) -> Tensor:
    """CUDA version of ``fastcl.objectives.targets.slr_target``. [B, C] CUDA -> [B, C] fp32 CUDA."""
    x = teacher_sims.detach().to(torch.float32).contiguous()
    b, dev = x.shape[0], x.device
    out = torch.empty_like(x)
    v, has_v = _valid(valid, dev)
    p = pos.detach().to(device=dev, dtype=torch.int64).contiguous()
    mu_, t_ = _rows(mu, b, dev), _rows(temperature, b, dev)
    launch_slr(_dev(x), _dev(p), _dev(mu_), _dev(t_), _dev(v), has_v, _dev(out), _stream())
    return out


def ifnd_valid(pos: Tensor, row_labels: Tensor, col_labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """CUDA version of ``fastcl.objectives.targets.ifnd_valid`` -> [B, C] bool CUDA."""
    dev = col_labels.device
    rl, cl = _labels(row_labels, dev), _labels(col_labels, dev)
    out = torch.empty(rl.shape[1], cl.shape[1], dtype=torch.bool, device=dev)
    v, has_v = _valid(valid, dev)
    p = pos.detach().to(device=dev, dtype=torch.int64).contiguous()
    launch_ifnd(_dev(p), _dev(rl), _dev(cl), _dev(v), has_v, _dev(out), _stream())
    return out


def ifnd_attraction_target(pos: Tensor, row_labels: Tensor, col_labels: Tensor,
                           valid: Tensor | None = None) -> Tensor:
    """CUDA version of ``fastcl.objectives.targets.ifnd_attraction_target`` -> [B, C] fp32 CUDA."""
    dev = col_labels.device
    rl, cl = _labels(row_labels, dev), _labels(col_labels, dev)
    out = torch.empty(rl.shape[1], cl.shape[1], dtype=torch.float32, device=dev)
    v, has_v = _valid(valid, dev)
    p = pos.detach().to(device=dev, dtype=torch.int64).contiguous()
    launch_attraction(_dev(p), _dev(rl), _dev(cl), _dev(v), has_v, _dev(out), _stream())
    return out
