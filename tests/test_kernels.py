"""fastcl.kernels: numba CPU kernels and numba.cuda kernels against the torch reference (fastcl.objectives).

The CUDA kernels run (a) on numba's CUDA simulator in a separate process (tests/_cudasim_worker.py; the
NUMBA_ENABLE_CUDASIM switch is process-global) and (b) on torch CUDA tensors when a GPU is present (@gpu).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastcl.kernels as kernels
from fastcl.kernels import reference as R

REPO = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-8)

# (B, C): degenerate, odd, smaller and larger than the 8/16 unroll widths, and a queue-sized row.
SHAPES = [(1, 1), (3, 2), (5, 17), (7, 100), (13, 1000), (3, 65537)]


def _inputs(b: int, c: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    sims = torch.rand(b, c, generator=g) * 2 - 1
    pos = torch.randint(0, c, (b,), generator=g)
    sims[torch.arange(b), pos] = 1.0
    valid = torch.rand(b, c, generator=g) > 0.3
    valid[0] = False  # row 0 has only its positive (empty relational set)
    valid[torch.arange(b), pos] = True
    rl = torch.randint(-1, 5, (3, b), generator=g)
    cl = torch.randint(-1, 5, (3, c), generator=g)
    return sims, pos, valid, rl, cl


def _cases(device: str = "cpu"):
    for k, (b, c) in enumerate(SHAPES):
        sims, pos, valid, rl, cl = (t.to(device) for t in _inputs(b, c, k))
        for v in (None, valid):
            yield (b, c, v is not None), sims, pos, v, rl, cl


def _compare(backend: str, device: str = "cpu") -> None:
    for tag, sims, pos, v, rl, cl in _cases(device):
        b = sims.shape[0]
        lam = torch.linspace(0.1, 0.9, b, device=device)
        for self_logit in (None, 0.0):
            torch.testing.assert_close(
                kernels.sce_target(sims, pos, lam, 0.05, v, self_logit=self_logit, backend=backend),
                R.sce_target(sims, pos, lam, 0.05, v, self_logit=self_logit), **TOL, msg=lambda m: f"sce {tag}: {m}")
        mu = torch.linspace(0.0, 3.0, b, device=device)
        torch.testing.assert_close(kernels.slr_target(sims, pos, mu, 0.16, v, backend=backend),
                                   R.slr_target(sims, pos, mu, 0.16, v), **TOL, msg=lambda m: f"slr {tag}: {m}")
        torch.testing.assert_close(kernels.slr_target(sims, pos, 1.0, 0.16, v, backend=backend),
                                   R.slr_target(sims, pos, 1.0, 0.16, v), **TOL, msg=lambda m: f"slr {tag}: {m}")
        assert torch.equal(kernels.ifnd_valid(pos, rl, cl, v, backend=backend), R.ifnd_valid(pos, rl, cl, v)), tag
        torch.testing.assert_close(kernels.ifnd_attraction_target(pos, rl, cl, v, backend=backend),
                                   R.ifnd_attraction_target(pos, rl, cl, v), **TOL, msg=lambda m: f"attr {tag}: {m}")


def test_kernels_package_is_this_repository():
    assert Path(kernels.__file__).resolve().parent == REPO / "kernels"


def test_numba_cpu_matches_reference():
    _compare("numba")


def test_numba_cpu_is_queue_scale_accurate():
    # 8 rows of a 65,536-wide queue at SCE/SLR temperatures: the regime the benchmark times.
    g = torch.Generator().manual_seed(7)
    sims = torch.rand(8, 65536, generator=g) * 2 - 1
    pos = torch.randint(0, 65536, (8,), generator=g)
    torch.testing.assert_close(kernels.sce_target(sims, pos, 0.5, 0.05, backend="numba"),
                               R.sce_target(sims, pos, 0.5, 0.05), **TOL)
    torch.testing.assert_close(kernels.slr_target(sims, pos, 10.0, 0.16, backend="numba"),
                               R.slr_target(sims, pos, 10.0, 0.16), **TOL)


def test_numba_cpu_exp_accuracy():
    """The kernels' own exp (``_exp32``, inlined into every numba CPU target) against float64 exp."""
    from numba import njit

    from fastcl.kernels.cpu import _exp32

    @njit
    def exp32_array(x, out):  # out = _exp32(x) elementwise, [N] fp32
        for j in range(x.shape[0]):
            out[j] = _exp32(x[j])

    x = torch.linspace(-87.0, 0.0, 200_001)
    out = torch.empty_like(x)
    exp32_array(x.numpy(), out.numpy())
    ref = torch.exp(x.double())
    assert ((out.double() - ref).abs() / ref).max() < 3e-7
    tiny = torch.tensor([-88.0, -200.0, -float("inf")])
    out = torch.empty_like(tiny)
    exp32_array(tiny.numpy(), out.numpy())
    assert (out == 0).all()


def test_numba_cpu_handles_views_and_grad_inputs():
    sims, pos, valid, rl, cl = _inputs(6, 300, 11)
    wide = torch.cat([sims, sims], dim=1)[:, ::2]  # non-contiguous view
    teacher = wide.clone().requires_grad_(True)
    out = kernels.sce_target(teacher, pos, 0.5, 0.1, valid, backend="numba")
    assert not out.requires_grad
    torch.testing.assert_close(out, R.sce_target(wide, pos, 0.5, 0.1, valid), **TOL)
    assert torch.equal(kernels.ifnd_valid(pos, rl.int(), cl.int(), valid, backend="numba"),
                       R.ifnd_valid(pos, rl, cl, valid))


def test_backend_choice():
    small, large = torch.zeros(4, 8), torch.zeros(256, kernels.NUMBA_CPU_MIN_ELEMENTS // 256)
    assert kernels.choose_backend("auto", small) == "torch"
    assert kernels.choose_backend("auto", large) == "cpu"
    assert kernels.choose_backend("numba", small) == "cpu"
    assert kernels.choose_backend("torch", large) == "torch"
    with pytest.raises(ValueError):
        kernels.choose_backend("triton", small)
    pos = torch.zeros(4, dtype=torch.int64)
    torch.testing.assert_close(kernels.sce_target(small, pos, 0.5, 0.1), R.sce_target(small, pos, 0.5, 0.1))


def test_cpu_path_never_imports_numba_cuda():
    code = ("import sys, torch, fastcl.kernels as k\n"
            "x = torch.rand(300, 1000); p = torch.randint(0, 1000, (300,))\n"
            "assert k.choose_backend('auto', x) == 'cpu'\n"
            "k.sce_target(x, p, 0.5, 0.1); k.ifnd_valid(p, torch.zeros(1, 300), torch.zeros(1, 1000))\n"
            "bad = [m for m in sys.modules if m.startswith(('numba.cuda', 'numba_cuda'))]\n"
            "assert not bad, bad\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cuda_kernels_on_simulator():
    pytest.importorskip("numba.cuda")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, str(REPO / "tests" / "_cudasim_worker.py")], capture_output=True,
                       text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


def test_cuda_usability_is_probed_by_compiling_a_kernel():
    """numba.cuda counts as usable only when a probe kernel compiles and runs (in the simulator here); a compile
    failure (libNVVM missing, PTX too new for the driver) falls back to torch with one warning line."""
    pytest.importorskip("numba.cuda")
    code = ("import warnings, fastcl.kernels as k\n"
            "assert k._cuda_usable()\n"
            "def broken():\n    raise RuntimeError('libNVVM cannot be found')\n"
            "k._compile_probe = broken; k._cuda_usable.cache_clear()\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    assert not k._cuda_usable() and not k._cuda_usable()\n"
            "assert len(w) == 1 and 'libNVVM' in str(w[0].message) and 'torch' in str(w[0].message), w\n"
            "assert k.describe('auto', 'cuda').startswith('torch')\n"
            "print('OK')\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_on_torch_tensors():
    assert kernels.choose_backend("auto", torch.zeros(2, 2, device="cuda")) == "cuda"
    _compare("numba", device="cuda")
    # queue-scale, on a side stream: the kernels must follow torch's current stream
    g = torch.Generator().manual_seed(0)
    sims = (torch.rand(256, 65536, generator=g) * 2 - 1).cuda()
    pos = torch.randint(0, 65536, (256,), generator=g).cuda()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = kernels.sce_target(sims, pos, 0.5, 0.05, backend="numba")
        want = R.sce_target(sims, pos, 0.5, 0.05)
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, **TOL)


def test_dispatcher_cleanup_survives_a_stale_signature_key():
    """numba's dispatcher finalizer walks an OrderedDict of signatures; a key whose hash moved since it was stored
    made it raise KeyError (printed as "Exception ignored in <finalize object>", 14x per suite run with ffcv).
    fastcl.kernels.numba_quiet's finalizer reads the dict's values without lookups and releases every entry."""
    from collections import OrderedDict
    from types import SimpleNamespace

    from fastcl.kernels.numba_quiet import install, release_finalizer

    class Key:
        h = 1

        def __hash__(self):
            return Key.h

    od = OrderedDict([(Key(), SimpleNamespace(entry_point="f"))])
    Key.h = 2  # the stored key no longer hashes to its slot
    with pytest.raises(KeyError):
        list(od.values())  # what numba's own finalizer does
    released = []
    ctx = SimpleNamespace(remove_user_function=released.append)
    release_finalizer(od, ctx, lambda: False)()
    assert released == ["f"]
    install()
    from numba.core import dispatcher
    assert dispatcher._DispatcherBase._fastcl_quiet_finalizer


def test_the_objectives_api_chooses_the_kernel_backend():
    """objectives.<target>(..., backend=) is the one entry the methods call: torch = the reference, numba = the
    kernel package (imported on demand), the same numbers either way."""
    from fastcl import objectives
    from fastcl.objectives import targets as R

    g = torch.Generator().manual_seed(0)
    sims = torch.rand(64, 4096, generator=g) * 2 - 1
    pos = torch.randint(0, 4096, (64,), generator=g)
    assert torch.equal(objectives.sce_target(sims, pos, 0.5, 0.05), R.sce_target(sims, pos, 0.5, 0.05))
    for backend in ("numba", "auto"):
        torch.testing.assert_close(objectives.sce_target(sims, pos, 0.5, 0.05, backend=backend),
                                   kernels.sce_target(sims, pos, 0.5, 0.05, backend=backend))
        torch.testing.assert_close(objectives.slr_target(sims, pos, 3.0, 0.16, backend=backend),
                                   R.slr_target(sims, pos, 3.0, 0.16), rtol=1e-4, atol=1e-6)
