"""`python -m fastcl.bench kernels [--rows 256] [--cols 65536] [--repeats 5] [--levels 3] [--threads N] [--name S]`

Times each label-assignment kernel, torch reference (``fastcl.kernels.reference``) against the numba CPU kernel
(``fastcl.kernels.cpu``), and against the numba.cuda kernel on a GPU when one is usable, at B x C fp32
(default 256 x 65,536: a batch against a MoCo-size queue):

* ``sce_target``   λ = 0.5, τ_m = 0.05 (SCE's CIFAR-10 config), exact self-exclusion, all columns valid;
* ``slr_target``   µ = 1, temperature 0.2 · 0.8 = 0.16 (SANE CIFAR), all columns valid;
* ``ifnd_valid``   L levels of pseudo-labels (cluster counts 100, 200, 400, ...; 30 % unaccepted = −1);
* ``ifnd_attraction_target`` on the same labels;
* ``sce_target+valid``, ``slr_target+valid``: the same with a valid mask (1 % of columns masked), the code path the
  methods use (they always pass a mask).

Method: inputs built once; one untimed call per implementation first (numba cache load / JIT, CUDA module load are
excluded and reported as such); then ``repeats`` rounds, each timing the reference once and the kernel once
(interleaved, so load drift from other processes hits both alike), each call wrapped by
``common.time_repeats`` (perf_counter, CUDA synchronised). Outputs include their allocation, as in real use.
Reports medians and the speedup ratio reference / kernel; every kernel output is checked against the reference
(max abs and max relative error) before timing. Evidence: docs/benchmarks/kernels.json.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from fastcl.lab.benchmarks.common import time_repeats, write_evidence
from fastcl.kernels import reference


def _load() -> list[float] | None:
    """1/5/15-minute load averages: other processes on the machine skew CPU timings (docs/BENCHMARKS.md)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _numba_layer() -> str:
    """The threading layer numba actually picked (known once a parallel kernel has run)."""
    import numba
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel ran (--no-cpu)
        return f"not started (config: {numba.config.THREADING_LAYER})"


def _inputs(rows: int, cols: int, levels: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sims = torch.rand(rows, cols, generator=g) * 2 - 1  # cosines
    pos = torch.arange(rows) % cols                      # SANE layout: columns = [batch keys ; queue]
    sims[torch.arange(rows), pos] = 1.0                  # the key's cosine with itself
    k = [100 * 2 ** lev for lev in range(levels)]
    row_labels = torch.stack([torch.randint(0, kk, (rows,), generator=g) for kk in k])
    col_labels = torch.stack([torch.randint(0, kk, (cols,), generator=g) for kk in k])
    row_labels[torch.rand(row_labels.shape, generator=g) < 0.3] = -1
    col_labels[torch.rand(col_labels.shape, generator=g) < 0.3] = -1
    valid = torch.rand(rows, cols, generator=g) > 0.01  # 1 % masked columns
    valid[torch.arange(rows), pos] = True
    return [t.to(device) for t in (sims, pos, row_labels, col_labels, valid)]


def _calls(impl, sims, pos, rl, cl, valid) -> dict:
    return {
        "sce_target": lambda: impl.sce_target(sims, pos, 0.5, 0.05),
        "slr_target": lambda: impl.slr_target(sims, pos, 1.0, 0.16),
        "ifnd_valid": lambda: impl.ifnd_valid(pos, rl, cl),
        "ifnd_attraction_target": lambda: impl.ifnd_attraction_target(pos, rl, cl),
        # the methods always pass a mask (empty queue slots, SimCLR self-pairs): the masked code paths
        "sce_target+valid": lambda: impl.sce_target(sims, pos, 0.5, 0.05, valid),
        "slr_target+valid": lambda: impl.slr_target(sims, pos, 1.0, 0.16, valid),
    }


def _errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    if got.dtype == torch.bool:
        return {"mismatches": int((got != want).sum())}
    diff = (got.double() - want.double()).abs()
    rel = diff / want.double().abs().clamp_min(1e-30)
    return {"max_abs_err": float(diff.max()), "max_rel_err": float(rel[want != 0].max()) if (want != 0).any() else 0.0}


def _compare(name: str, ref_fns: dict, fast_fns: dict, repeats: int, device: str) -> list[dict]:
    rows = []
    for kernel, ref_fn in ref_fns.items():
        fast_fn = fast_fns[kernel]
        err = _errors(fast_fn(), ref_fn())  # also the untimed first call of each
        t_ref, t_fast = [], []
        for _ in range(repeats):
            t_ref.append(time_repeats(ref_fn, repeats=1, warmup=0, device=device)["median_s"])
            t_fast.append(time_repeats(fast_fn, repeats=1, warmup=0, device=device)["median_s"])
        ref_med, fast_med = statistics.median(t_ref), statistics.median(t_fast)
        rows.append({"kernel": kernel, "backend": name, "device": device, "torch_median_s": ref_med,
                     f"{name}_median_s": fast_med, "kernel_median_s": fast_med, "speedup": ref_med / fast_med,
                     "torch_times_s": t_ref, "kernel_times_s": t_fast, **err})
        print(f"{kernel:24s} {device:4s} torch {ref_med * 1e3:9.3f} ms   {name:10s} {fast_med * 1e3:9.3f} ms   "
              f"x{ref_med / fast_med:5.2f}   {err}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m fastcl.bench kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--levels", type=int, default=3, help="IFND pseudo-label levels")
    ap.add_argument("--threads", type=int, default=0, help="torch and numba threads (0 = leave the defaults)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU comparison (GPU runs)")
    ap.add_argument("--out-dir", default="docs/benchmarks")
    ap.add_argument("--name", default="", help="evidence file stem (default kernels, or kernels-threadsN)")
    args = ap.parse_args(argv)

    import numba

    load_start = _load()
    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    results = []
    if not args.no_cpu:
        from fastcl.kernels import cpu
        inputs = _inputs(args.rows, args.cols, args.levels, "cpu")
        results += _compare("numba_cpu", _calls(reference, *inputs), _calls(cpu, *inputs), args.repeats, "cpu")
    cuda_note = "no CUDA device"
    if torch.cuda.is_available():
        from fastcl.kernels import choose_backend
        inputs = _inputs(args.rows, args.cols, args.levels, "cuda")
        if choose_backend("auto", inputs[0]) == "cuda":
            from fastcl.kernels import cuda
            results += _compare("numba_cuda", _calls(reference, *inputs), _calls(cuda, *inputs), args.repeats,
                                "cuda")
            cuda_note = "measured"
        else:
            cuda_note = "torch sees a GPU but numba.cuda is not usable"
    name = args.name or (f"kernels-threads{args.threads}" if args.threads else "kernels")
    path = write_evidence(name, {
        "command": "python -m fastcl.bench kernels " + " ".join(argv or []),
        "config": {"rows": args.rows, "cols": args.cols, "repeats": args.repeats, "levels": args.levels,
                   "dtype": "float32", "sce": {"lam": 0.5, "tau_m": 0.05}, "slr": {"mu": 1.0, "temperature": 0.16},
                   "ifnd": {"clusters": [100 * 2 ** lev for lev in range(args.levels)], "unaccepted": 0.3}},
        "threads": {"torch": torch.get_num_threads(), "numba": numba.get_num_threads(),
                    "numba_layer": _numba_layer()},
        "load_average_1_5_15min": {"start": load_start, "end": _load()},
        # torch's allocator madvises huge pages when this is 1: page faults are a large share of both paths here
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "cuda": cuda_note,
        "timing": "interleaved rounds (reference, kernel) x repeats, each call via common.time_repeats(repeats=1); "
                  "first call of each implementation untimed (numba cache load / JIT excluded); "
                  "outputs allocated inside the timed call",
        "results": results,
    }, out_dir=args.out_dir)
    return {"path": path, "results": results}
