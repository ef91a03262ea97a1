"""numba CPU kernels for the label-assignment targets: row-parallel, fused, zero-copy on CPU torch tensors.

Each kernel computes exactly what the matching function in ``fastcl.objectives.targets`` computes (those are the
ground truth, see ``fastcl.kernels.reference``), working on ``Tensor.numpy()`` views (no copy) and writing into an
output that torch allocated. Why they beat the torch reference on a 2-core CPU (docs/BENCHMARKS.md "Kernels"):

* One row (65,536 fp32 = 256 KB) stays in L2 across the kernel's passes (max, exp, sum, scale), so DRAM sees one
  read of the similarities and one write of the target; torch streams the whole [B, C] matrix through memory once
  per op and allocates (and page-faults) a 64 MB temporary for most of them. Our one output is backed by huge
  pages where the OS allows (``_empty``): first-touch page faults were the largest single cost.
* ``exp`` is our own branch-free polynomial (``_exp32``). numba calls libm's scalar ``expf`` (no SVML here), which
  blocks vectorisation; the polynomial is plain arithmetic, so LLVM vectorises the loop with fastmath off.
  Explicit FMAs (``_fma``, exact IEEE operations) halve its instruction count, and replace the slow vector
  division by tau with a bit-exact reciprocal-and-correct sequence (``_div``).
* Reductions are written so LLVM can vectorise them with fastmath off: the row max on order-preserving int32
  keys of the float bits (integer max reductions need no fastmath flags), sums in 16 explicit lanes
  (reassociated by hand, deterministically; one running float sum would stay a scalar chain).

Conventions (as in the targets module): x / out [B, C] fp32 C-contiguous; pos [B] int64; per-row scalars as [B]
fp32 arrays; ``valid`` [B, C] bool, or a [1, 1] bool dummy with ``has_valid=False`` (then it is never read).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic
from torch import Tensor

from fastcl.kernels import numba_quiet

numba_quiet.install()  # before the @njit functions below exist

__all__ = ["sce_target", "slr_target", "ifnd_valid", "ifnd_attraction_target"]

_F = np.float32
_NEG_INF = _F(-np.inf)
_ZERO = _F(0.0)
_ONE = _F(1.0)
# Cephes expf: exp(x) = 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for exactness),
# p a degree-7 polynomial; max relative error ~1.2e-7 on [-87, 0] (measured against torch.exp).
# n is rounded with the 1.5 * 2^23 "magic number": after t = x log2(e) + magic the low mantissa bits of t ARE n,
# so no floor() (which numba lowers to a libm call in some loops) and no float->int conversion is needed.
_LOG2E = _F(1.44269504088896341)
_MAGIC = _F(12582912.0)
_MAGIC_BITS = np.int32(np.array([_MAGIC]).view(np.int32)[0])
_LN2_HI = _F(0.693359375)
_LN2_LO = _F(-2.12194440e-4)
_P0, _P1, _P2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_P3, _P4, _P5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)
_LO = _F(-87.0)  # below this the result is < 2^-125: flushed to 0 (torch gives denormals of ~1e-38)
_JIT = dict(cache=True, fastmath=False, nogil=True)


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c with ONE rounding (llvm.fma -> vfmadd). An exact IEEE operation, not a fastmath relaxation: with
    fastmath off LLVM never fuses a*b+c by itself, and the polynomial and the division below halve their
    instruction count with it (and gain accuracy)."""
    if not (a == types.float32 and b == types.float32 and c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(inline="always", **_JIT)
def _exp32(x):
    """exp(x) for fp32 x <= 88, branch-free (vectorisable). x < -87 (and -inf, NaN) -> 0.

    No clamping of x: out-of-range x only garbles the exponent bits of a value the final select discards
    (the magic-number rounding has no undefined float->int conversion), and every caller passes x <= 0.
    """
    t = _fma(x, _LOG2E, _MAGIC)  # round-to-nearest of x / ln 2, held in t's low mantissa bits
    n = t - _MAGIC
    r = _fma(n, -_LN2_HI, x)
    r = _fma(n, -_LN2_LO, r)
    p = _fma(_fma(_fma(_fma(_fma(_P0, r, _P1), r, _P2), r, _P3), r, _P4), r, _P5)
    p = _fma(p, r * r, r) + _ONE
    k = np.float32(t).view(np.int32) - _MAGIC_BITS  # = n as an integer
    scale = np.int32((k + np.int32(127)) << np.int32(23)).view(np.float32)  # 2^n built from its exponent bits
    return p * scale if x >= _LO else _ZERO


@njit(inline="always", **_JIT)
def _div(a, b, inv_b):
    """a / b for fp32, bit-identical to IEEE division (checked on 5e7 samples x 10 divisors), from the
    reciprocal inv_b = 1/b: one multiply, then one Newton/Markstein correction with the exact residual
    a - q*b (an FMA). vdivps is ~3x the cost of these three FMA-class ops, and a bare a * inv_b differs from
    torch's ``sims / tau`` in up to half the entries by 1 ulp (~5e-6 relative after exp of a logit of ~20)."""
    q = a * inv_b
    return _fma(_fma(-q, b, a), inv_b, q)


_SIGN_SHIFT = np.int32(31)
_ABS_MASK = np.int32(0x7FFFFFFF)
_NEG_INF_BITS = np.array([-np.inf], dtype=np.float32).view(np.int32)[0]
_NEG_INF_KEY = np.int32(_NEG_INF_BITS ^ ((_NEG_INF_BITS >> 31) & 0x7FFFFFFF))  # _order_key(-inf)


@njit(inline="always", **_JIT)
def _order_key(bits):
    """int32 key of a float32's bits with the same order as the floats (negative floats: flip magnitude bits).

    The max reduction runs on these keys because LLVM vectorises an integer max reduction as it stands, while a
    float max reduction needs fastmath's no-NaN flag (it stayed a scalar maxss chain: 2x slower here).
    """
    return np.int32(bits ^ ((bits >> _SIGN_SHIFT) & _ABS_MASK))


@njit(inline="always", **_JIT)
def _max_range(row, vrow, has_valid, lo, hi, m):
    """max(m, max of row[lo:hi] over valid entries) for fp32 row; -inf if none. Slices first, so the loops
    start at 0 (no negative-index wraparound test in the loop, which would block vectorisation)."""
    seg = row[lo:hi].view(np.int32)
    best = _order_key(np.float32(m).view(np.int32))
    if has_valid:
        vseg = vrow[lo:hi]
        for j in range(seg.shape[0]):
            k = _order_key(seg[j]) if vseg[j] else _NEG_INF_KEY
            best = k if k > best else best
    else:
        for j in range(seg.shape[0]):
            k = _order_key(seg[j])
            best = k if k > best else best
    return np.int32(_order_key(best)).view(np.float32)  # the key map is its own inverse


@njit(inline="always", **_JIT)
def _sum(row):
    """Sum of a fp32 row in 16 independent accumulators, combined pairwise: breaks the dependency chain of one
    running sum (which LLVM may not reassociate with fastmath off) and each lane adds only C/16 terms."""
    n = row.shape[0]
    n16 = n // 16 * 16
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = _ZERO
    s8 = s9 = s10 = s11 = s12 = s13 = s14 = s15 = _ZERO
    for j in range(0, n16, 16):
        s0 += row[j]
        s1 += row[j + 1]
        s2 += row[j + 2]
        s3 += row[j + 3]
        s4 += row[j + 4]
        s5 += row[j + 5]
        s6 += row[j + 6]
        s7 += row[j + 7]
        s8 += row[j + 8]
        s9 += row[j + 9]
        s10 += row[j + 10]
        s11 += row[j + 11]
        s12 += row[j + 12]
        s13 += row[j + 13]
        s14 += row[j + 14]
        s15 += row[j + 15]
    for j in range(n16, n):
        s0 += row[j]
    low = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    return low + (((s8 + s9) + (s10 + s11)) + ((s12 + s13) + (s14 + s15)))


_LANES = 16
_CHUNK = 1024  # columns per fp32 partial sum (a multiple of _LANES)


@njit(inline="always", **_JIT)
def _exp_sum_range(row, vrow, has_valid, lo, hi, tau, shift, o, acc):
    """o[j] = exp(row[j] / tau - shift) for j in [lo, hi) on valid columns (0 on invalid ones); returns their sum.

    The logits row[j] / tau are bit-identical to the torch reference's ``sims / tau`` (see ``_div``).
    Fused so each element is read once. The sum runs in _LANES independent fp32 lanes held in ``acc`` ([_LANES]
    scratch), so the inner k-loop is an elementwise vector op (one running sum would stay a scalar chain: LLVM may
    not reassociate it with fastmath off); lanes restart every _CHUNK columns and chunk totals add up in fp64,
    so the rounding error stays ~1e-7 relative at any row length (one fp32 lane over 4,096 terms reached 5e-6).
    """
    inv = _ONE / tau
    total = 0.0  # fp64: chunk sums add up without growing error
    for c0 in range(lo, hi, _CHUNK):
        c1 = min(c0 + _CHUNK, hi)
        # Every loop below runs 0..n over fresh slices: a loop index offset by a run-time start makes numba
        # emit negative-index wraparound checks, which cost 2.5x here (measured) by defeating vectorisation.
        seg, oseg = row[c0:c1], o[c0:c1]
        n = seg.shape[0]
        n_full = n // _LANES * _LANES
        for k in range(_LANES):
            acc[k] = _ZERO
        if has_valid:
            vseg = vrow[c0:c1]
            for j in range(0, n_full, _LANES):
                for k in range(_LANES):
                    e = _exp32(_div(seg[j + k], tau, inv) - shift) if vseg[j + k] else _ZERO
                    oseg[j + k] = e
                    acc[k] += e
            for j in range(n_full, n):
                e = _exp32(_div(seg[j], tau, inv) - shift) if vseg[j] else _ZERO
                oseg[j] = e
                acc[0] += e
        else:
            for j in range(0, n_full, _LANES):
                for k in range(_LANES):
                    e = _exp32(_div(seg[j + k], tau, inv) - shift)
                    oseg[j + k] = e
                    acc[k] += e
            for j in range(n_full, n):
                e = _exp32(_div(seg[j], tau, inv) - shift)
                oseg[j] = e
                acc[0] += e
        w = _LANES
        while w > 1:  # pairwise combine of the lanes
            w //= 2
            for k in range(w):
                acc[k] += acc[k + w]
        total += acc[0]
    return np.float32(total)


@njit(parallel=True, **_JIT)
def sce_kernel(x, pos, lam, tau_m, valid, has_valid, self_logit, has_self, out):
    """SCE target rows into out. x, out [B, C] fp32; pos [B] int64; lam, tau_m [B] fp32; valid [B, C] bool;
    self_logit fp32 (used when has_self). See ``fastcl.objectives.targets.sce_target``."""
    B, C = x.shape
    for i in prange(B):
        row, o, vrow = x[i], out[i], valid[i % valid.shape[0]]  # the [1, 1] dummy when not has_valid
        p, tau, lm = pos[i], tau_m[i], lam[i]
        # Max over the relational columns (valid, not the positive): two ranges around p, no per-column test.
        m = _max_range(row, vrow, has_valid, 0, p, _NEG_INF)
        m = _max_range(row, vrow, has_valid, p + 1, C, m)
        if m == _NEG_INF and not has_self:
            # No relational column at all: one-hot (the targets module's convention for an empty row).
            for j in range(C):
                o[j] = _ZERO
            o[p] = _ONE
            continue
        shift = m / tau
        if has_self:
            shift = max(shift, self_logit)
        acc = np.empty(_LANES, dtype=np.float32)
        s = _exp_sum_range(row, vrow, has_valid, 0, p, tau, shift, o, acc)
        s += _exp_sum_range(row, vrow, has_valid, p + 1, C, tau, shift, o, acc)
        o[p] = _ZERO
        e_self = _exp32(self_logit - shift) if has_self else _ZERO
        scale = (_ONE - lm) / (s + e_self)
        for j in range(C):
            o[j] *= scale
        o[p] = lm + e_self * scale


@njit(parallel=True, **_JIT)
def slr_kernel(x, pos, mu, temperature, valid, has_valid, out):
    """SLR refined-label rows into out. x, out [B, C] fp32; pos [B] int64; mu, temperature [B] fp32; valid [B, C].

    With u_j = exp(x_j/T − m_q) over the valid non-positive columns (m_q their max logit), s = Σu and
    r = exp(m_q − m_p): q_j = u_j/s, p_j = r·u_j/Z_p with Z_p = r·s + exp(x_pos/T − m_p); max q = 1/s and
    max p = 1/Z_p (the largest term of each sum is exp(0)). So the target off the positive is u_j times ONE
    per-row coefficient, and every exponent is <= 0 (no overflow) whichever of pos / others holds the max.
    """
    B, C = x.shape
    for i in prange(B):
        row, o, vrow = x[i], out[i], valid[i % valid.shape[0]]  # the [1, 1] dummy when not has_valid
        p, tau, mu_i = pos[i], temperature[i], mu[i]
        m = _max_range(row, vrow, has_valid, 0, p, _NEG_INF)
        m = _max_range(row, vrow, has_valid, p + 1, C, m)
        if m == _NEG_INF:  # only the positive is valid: p = e_pos, q = 0, target one-hot
            for j in range(C):
                o[j] = _ZERO
            o[p] = _ONE
            continue
        m_q = m / tau
        x_pos = row[p] / tau
        m_p = max(m_q, x_pos)
        acc = np.empty(_LANES, dtype=np.float32)
        s = _exp_sum_range(row, vrow, has_valid, 0, p, tau, m_q, o, acc)
        s += _exp_sum_range(row, vrow, has_valid, p + 1, C, tau, m_q, o, acc)
        o[p] = _ZERO
        r = _exp32(m_q - m_p)
        e_pos = _exp32(x_pos - m_p)
        z_p = r * s + e_pos
        wp = mu_i / z_p   # µ·max p
        wq = mu_i / s     # µ·max q
        inv_z = _ONE / (_ONE + wp + wq)
        coef = (wp * r / z_p + wq / s) * inv_z
        for j in range(C):
            o[j] *= coef
        o[p] = (_ONE + wp * e_pos / z_p) * inv_z


@njit(parallel=True, **_JIT)
def ifnd_kernel(pos, row_labels, col_labels, valid, has_valid, out):
    """IFND elimination mask rows into out [B, C] bool: valid & ~(shared accepted label at any level);
    the positive keeps its ``valid`` value. row_labels [L, B], col_labels [L, C] int (negative = not accepted)."""
    L, C = col_labels.shape
    B = row_labels.shape[1]
    for i in prange(B):
        o = out[i]
        if has_valid:
            vrow = valid[i]
            for j in range(C):
                o[j] = vrow[j]
        else:
            for j in range(C):
                o[j] = True
        for lev in range(L):
            r = row_labels[lev, i]
            if r < 0:  # unaccepted anchor: eliminates nothing at this level
                continue
            c = col_labels[lev]
            for j in range(C):
                o[j] = o[j] & (c[j] != r)
        p = pos[i]
        o[p] = valid[i, p] if has_valid else True


@njit(parallel=True, **_JIT)
def ifnd_attraction_kernel(pos, row_labels, col_labels, valid, has_valid, out):
    """IFND attraction target rows into out [B, C] fp32: uniform over {pos} ∪ valid detected FNs."""
    L, C = col_labels.shape
    B = row_labels.shape[1]
    for i in prange(B):
        o = out[i]
        for j in range(C):
            o[j] = _ZERO
        for lev in range(L):
            r = row_labels[lev, i]
            if r < 0:
                continue
            c = col_labels[lev]
            for j in range(C):
                o[j] = _ONE if c[j] == r else o[j]
        if has_valid:
            vrow = valid[i]
            for j in range(C):
                o[j] = o[j] if vrow[j] else _ZERO
        o[pos[i]] = _ONE
        inv_n = _ONE / _sum(o)
        for j in range(C):
            o[j] *= inv_n


# ----------------------------------------------------------------------------------------------------------------
# torch wrappers: CPU tensors in, CPU tensors out (outputs allocated by torch, kernels write through .numpy()).

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise via ctypes, or None off Linux / without a C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _empty(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """torch.empty for a kernel output, backed by transparent huge pages where the kernel allows it.

    A fresh 64 MB tensor is a fresh mmap: its first write takes 16,384 4-KB page faults, which doubled the SCE
    kernel's time here (256 x 65,536: 2.1-2.2x the time of writing into an already-touched buffer, 1 or 2
    threads). Advising huge pages on the 2 MB-aligned interior (what torch does for every allocation under
    THP_MEM_ALLOC_ENABLE=1) cuts that to 32 faults (1.25-1.4x). Advice only: with THP off ("never"), or if the
    call fails, the tensor is a normal one. Outputs under 8 MB are left alone.
    """
    out = torch.empty(rows, cols, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    madvise = _madvise() if nbytes >= 4 * _HUGE_PAGE else None
    if madvise is not None:
        start = (out.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        end = (out.data_ptr() + nbytes) & ~(_HUGE_PAGE - 1)
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)
    return out


def _f32(t: Tensor) -> np.ndarray:
    return t.detach().to(dtype=torch.float32).contiguous().numpy()


def _row_array(x: float | Tensor, b: int) -> np.ndarray:
    """A per-row scalar (float, 0-dim or [B] tensor) as a [B] fp32 array."""
    if isinstance(x, Tensor):
        a = x.detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy()
        # A writable copy: broadcast_to gives a read-only view, which numba would compile a second kernel for.
        return np.broadcast_to(a, (b,)).copy()
    return np.full(b, x, dtype=np.float32)


def _valid_array(valid: Tensor | None) -> tuple[np.ndarray, bool]:
    if valid is None:
        return np.ones((1, 1), dtype=np.bool_), False  # never read: has_valid=False
    return valid.detach().to(dtype=torch.bool).contiguous().numpy(), True


def _pos_array(pos: Tensor) -> np.ndarray:
    return pos.detach().to(dtype=torch.int64).contiguous().numpy()


def _labels(labels: Tensor) -> np.ndarray:
    labels = labels.detach()
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    return labels.to(dtype=torch.int64).contiguous().numpy()


def sce_target(teacher_sims: Tensor, pos: Tensor, lam: float | Tensor, tau_m: float | Tensor,
               valid: Tensor | None = None, *, self_logit: float | None = None) -> Tensor:
    """numba version of ``fastcl.objectives.targets.sce_target``; CPU tensors. [B, C] -> [B, C] fp32."""
    x = _f32(teacher_sims)
    b, c = x.shape
    out = _empty(b, c, torch.float32)
    v, has_v = _valid_array(valid)
    sce_kernel(x, _pos_array(pos), _row_array(lam, b), _row_array(tau_m, b), v, has_v,
               np.float32(0.0 if self_logit is None else self_logit), self_logit is not None, out.numpy())
    return out


def slr_target(teacher_sims: Tensor, pos: Tensor, mu: float | Tensor, temperature: float | Tensor,
               valid: Tensor | None = None) -> Tensor:
    """numba version of ``fastcl.objectives.targets.slr_target``; CPU tensors. [B, C] -> [B, C] fp32."""
    x = _f32(teacher_sims)
    b, c = x.shape
    out = _empty(b, c, torch.float32)
    v, has_v = _valid_array(valid)
    slr_kernel(x, _pos_array(pos), _row_array(mu, b), _row_array(temperature, b), v, has_v,
               out.numpy())
    return out


def ifnd_valid(pos: Tensor, row_labels: Tensor, col_labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """numba version of ``fastcl.objectives.targets.ifnd_valid``; CPU tensors -> [B, C] bool."""
    rl, cl = _labels(row_labels), _labels(col_labels)
    out = _empty(rl.shape[1], cl.shape[1], torch.bool)
    v, has_v = _valid_array(valid)
    ifnd_kernel(_pos_array(pos), rl, cl, v, has_v, out.numpy())
    return out


def ifnd_attraction_target(pos: Tensor, row_labels: Tensor, col_labels: Tensor,
                           valid: Tensor | None = None) -> Tensor:
    """numba version of ``fastcl.objectives.targets.ifnd_attraction_target``; CPU tensors -> [B, C] fp32."""
    rl, cl = _labels(row_labels), _labels(col_labels)
    out = _empty(rl.shape[1], cl.shape[1], torch.float32)
    v, has_v = _valid_array(valid)
    ifnd_attraction_kernel(_pos_array(pos), rl, cl, v, has_v, out.numpy())
    return out
