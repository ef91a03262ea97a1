"""Run the numba.cuda kernels on numba's CUDA simulator and compare them with the torch reference.

Started by tests/test_kernels.py in its OWN process: NUMBA_ENABLE_CUDASIM changes numba.cuda for the whole
interpreter, so it must never be set in the pytest process. torch has no CUDA here, so inputs are numpy arrays
moved with ``numba.cuda.to_device`` and the ``launch_*`` functions are called directly (the torch wrappers only add
``as_cuda_array`` views on top of the same launches; the @gpu test covers them on a real GPU).
Shapes are tiny (the simulator runs each thread as a Python thread) but wider than one block stride
(TPB = 32 under the simulator), with and without valid masks, empty rows and the compatibility mode.
Exit status 0 and a final "OK" line on success; an AssertionError otherwise.
"""
from __future__ import annotations

import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba.cuda is imported anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numba import cuda  # noqa: E402

from fastcl.kernels import cuda as K  # noqa: E402
from fastcl.kernels import reference as R  # noqa: E402


def _check(name: str, got: np.ndarray, want: torch.Tensor) -> None:
    want = want.numpy()
    if got.dtype == np.bool_:
        assert np.array_equal(got, want), f"{name}: {np.argwhere(got != want)[:5]}"
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)
    print(f"ok {name}", flush=True)


def main() -> int:
    assert K.TPB == 32, K.TPB
    rng = np.random.default_rng(0)
    n = 0
    for b, c in [(3, 70), (2, 5)]:
        x = rng.uniform(-1, 1, (b, c)).astype(np.float32)
        pos = rng.integers(0, c, b).astype(np.int64)
        x[np.arange(b), pos] = 1.0  # the key's own cosine, as in training
        valid = rng.random((b, c)) > 0.3
        valid[0] = False  # row 0: only the positive is valid (empty relational set)
        lam = np.array([0.5, 1.0, 0.0][:b], np.float32)
        mu = np.array([1.0, 0.0, 2.5][:b], np.float32)
        tau = np.full(b, 0.1, np.float32)
        rl = rng.integers(-1, 3, (2, b)).astype(np.int64)
        cl = rng.integers(-1, 3, (2, c)).astype(np.int64)
        tx, tp, tv = torch.from_numpy(x), torch.from_numpy(pos), torch.from_numpy(valid)
        trl, tcl = torch.from_numpy(rl), torch.from_numpy(cl)
        dummy = cuda.to_device(np.ones((1, 1), np.bool_))
        dx, dp, dlam, dmu, dtau = (cuda.to_device(a) for a in (x, pos, lam, mu, tau))
        drl, dcl, dv = cuda.to_device(rl), cuda.to_device(cl), cuda.to_device(valid)
        for use_valid in (False, True):
            v_dev, v_t = (dv, tv) if use_valid else (dummy, None)
            for self_logit in (None, 0.0):
                out = cuda.device_array((b, c), np.float32)
                K.launch_sce(dx, dp, dlam, dtau, v_dev, use_valid, 0.0 if self_logit is None else self_logit,
                             self_logit is not None, out)
                want = R.sce_target(tx, tp, torch.from_numpy(lam), 0.1, v_t, self_logit=self_logit)
                _check(f"sce B={b} C={c} valid={use_valid} self_logit={self_logit}", out.copy_to_host(), want)
            out = cuda.device_array((b, c), np.float32)
            K.launch_slr(dx, dp, dmu, dtau, v_dev, use_valid, out)
            _check(f"slr B={b} C={c} valid={use_valid}", out.copy_to_host(),
                   R.slr_target(tx, tp, torch.from_numpy(mu), 0.1, v_t))
            out = cuda.device_array((b, c), np.bool_)
            K.launch_ifnd(dp, drl, dcl, v_dev, use_valid, out)
            _check(f"ifnd_valid B={b} C={c} valid={use_valid}", out.copy_to_host(), R.ifnd_valid(tp, trl, tcl, v_t))
            out = cuda.device_array((b, c), np.float32)
            K.launch_attraction(dp, drl, dcl, v_dev, use_valid, out)
            _check(f"attraction B={b} C={c} valid={use_valid}", out.copy_to_host(),
                   R.ifnd_attraction_target(tp, trl, tcl, v_t))
            n += 5
    print(f"OK {n} checks", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
