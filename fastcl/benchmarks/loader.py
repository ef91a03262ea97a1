"""Loader-only throughput: `python -m fastcl.bench loader --backend all --data FOLDER [--beton F.beton] ...`

What is timed: one repeat = one full epoch (drop_last) of the Loader protocol over `--batches` batches of
`--batch` source images (the first batches*batch ids of the folder, via data.max_samples), every batch
yielding two augmented views of `--size` px with the default (MoCo-v2) AugSpec, normalized, on `--device`.
img/s counts SOURCE images (each gives two views). Reported per backend:
- `img_s` (headline): all images of the epoch over its wall time, per-epoch start-up included (worker
  restart, DALI pipeline build, ffcv producer start), as a trainer sees it; make epochs long enough
  (`--batches`) that the start-up is amortized as in real training;
- `best_img_s`: the fastest repeat, the least disturbed one when other jobs share the machine;
- `first_batch_s`: that start-up (time to the first batch);
- `init_s`: building the loader; ffcv also `convert_s` (folder -> .beton, when --beton is not given) and
  `compile_s` (its first, JIT-compiling epoch, which is excluded from every timed repeat).
Medians over `--repeats` repeats after one warm-up epoch per backend. With several backends the repeats
are interleaved (repeat r of every backend, then r+1), so that load from other processes on a shared machine
hits all of them alike and the ratios of one run stay comparable.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from fastcl.benchmarks.common import sync, write_evidence

BACKENDS = ("torch", "ffcv", "dali", "gpu_tensor")
# --aug crop_flip: no colour op at all, to time decode + crop + flip (+ normalize) alone
CROP_FLIP = [f"data.aug.views.{v}.{k}=0" for v in (0, 1) for k in ("jitter_p", "gray_p", "blur_p", "solarize_p")]


def _cfg(backend: str, path: str, a: argparse.Namespace):
    from fastcl.config import load_config

    mean, std = ("[0.4914,0.4822,0.4465]", "[0.247,0.2435,0.2616]") if a.size <= 64 else \
        ("[0.485,0.456,0.406]", "[0.229,0.224,0.225]")
    return load_config(None, [f"data.backend={backend}", f"data.path={path}", f"optim.batch_size={a.batch}",
                              "data.drop_last=true", f"data.workers={a.workers}", f"data.max_samples={a.n}",
                              f"data.aug.views.0.size={a.size}", f"data.aug.views.1.size={a.size}",
                              f"data.aug.mean={mean}", f"data.aug.std={std}", f"trainer.seed={a.seed}",
                              *(CROP_FLIP if a.aug == "crop_flip" else [])])


_STAGE = {"s": 0.0}  # seconds spent inside augment.device_stage during the current epoch (--profile)


def _profile_device_stage(device: str) -> None:
    """Wrap the `device_stage` each backend module imported, accumulating its time in _STAGE. On CUDA the
    wrapper synchronizes, which serializes the stream: use it to see where time goes, not for headline img/s."""
    import importlib

    from fastcl.pipelines import augment

    def timed(*args, **kw):
        t0 = time.perf_counter()
        out = augment.device_stage(*args, **kw)
        sync(device)
        _STAGE["s"] += time.perf_counter() - t0
        return out

    for mod in ("torch_loader", "ffcv_loader", "gpu_tensor"):
        try:
            m = importlib.import_module(f"fastcl.pipelines.{mod}")
        except ImportError:
            continue
        if getattr(m, "device_stage", None) is augment.device_stage:
            m.device_stage = timed


def _time_epoch(loader, epoch: int, device: str) -> dict:
    """Iterate one epoch; returns first_batch_s, total_s, images counted and device_stage_s (--profile)."""
    loader.set_epoch(epoch)
    _STAGE["s"] = 0.0
    t0 = time.perf_counter()
    t_first, n = None, 0
    for b in loader:
        sync(device)
        n += len(b.index)
        if t_first is None:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return {"first_batch_s": (t_first or t_end) - t0, "total_s": t_end - t0, "images": n, "img_s": n / (t_end - t0),
            "device_stage_s": _STAGE["s"]}


def _build(backend: str, a: argparse.Namespace, tmp: str) -> tuple[object, dict]:
    from fastcl.pipelines import build_loader

    info: dict = {}
    path = a.data
    if backend == "ffcv":
        if a.beton:
            path = a.beton
        else:
            from fastcl.pipelines.convert import convert

            path = os.path.join(tmp, "bench.beton")
            t0 = time.perf_counter()
            m = convert(a.data, path, write_mode=a.ffcv_write_mode, jpeg_quality=a.ffcv_jpeg_quality,
                        max_samples=a.n, workers=a.workers, progress=False)
            info.update(convert_s=time.perf_counter() - t0, beton_bytes=m["bytes"])
        info["beton"] = path
    t0 = time.perf_counter()
    loader = build_loader(_cfg(backend, path, a), 0, 1, a.device)
    info["init_s"] = time.perf_counter() - t0
    if len(loader) == 0:
        raise SystemExit(f"{backend}: 0 batches of {a.batch} from {path} ({loader.num_samples} samples)")
    return loader, info


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fastcl.bench loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="all", choices=(*BACKENDS, "all"))
    p.add_argument("--data", required=True, help="image folder (class sub-folders or flat)")
    p.add_argument("--beton", default="", help="ffcv: .beton of --data (default: convert --data into a temp file)")
    p.add_argument("--ffcv-write-mode", default="jpg", choices=("jpg", "raw", "smart", "proportion"),
                   help="when converting for ffcv")
    p.add_argument("--ffcv-jpeg-quality", type=int, default=90)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32, help="side of both views")
    p.add_argument("--batches", type=int, default=8, help="batches per timed epoch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aug", default="default", choices=("default", "crop_flip"),
                   help="default: the MoCo-v2 AugSpec; crop_flip: colour ops off (isolates decode + crop)")
    p.add_argument("--name", default="", help="evidence file name (default loader_<data>_<size>)")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--profile", action="store_true",
                   help="also time augment.device_stage inside each epoch (synchronizes on CUDA)")
    a = p.parse_args(argv)
    if a.profile:
        _profile_device_stage(a.device)
    a.n = a.batches * a.batch
    backends = list(BACKENDS) if a.backend == "all" else [a.backend]
    name = a.name or f"loader_{os.path.basename(os.path.normpath(a.data))}_{a.size}"

    load_start = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="fastcl_bench_")
    try:
        loaders, info = {}, {}
        for b in backends:
            try:
                loaders[b], info[b] = _build(b, a, tmp)
            except (ImportError, RuntimeError) as e:  # optional backend not installed: report, keep going
                info[b] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{b}: skipped ({e})")
        for b, ld in loaders.items():  # warm-up epoch; for ffcv this is the JIT compile
            w = _time_epoch(ld, 0, a.device)
            info[b]["warmup_s"] = w["total_s"]
            if b == "ffcv":
                info[b]["compile_s"] = w["total_s"]
        runs = {b: [] for b in loaders}
        for r in range(a.repeats):
            for b, ld in loaders.items():
                runs[b].append(_time_epoch(ld, r + 1, a.device))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results = {}
    for b, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in ("img_s", "first_batch_s")}
        med["best_img_s"] = max(x["img_s"] for x in rs)  # least disturbed repeat on a shared machine
        if a.profile:
            med["device_stage_share"] = statistics.median(x["device_stage_s"] / x["total_s"] for x in rs)
        results[b] = {**info[b], **med, "runs": rs}
    for b in info:
        results.setdefault(b, info[b])
    base = results.get("torch", {}).get("img_s")
    for b, r in results.items():
        if base and "img_s" in r:
            r["ratio_vs_torch"] = r["img_s"] / base
            r["best_ratio_vs_torch"] = r["best_img_s"] / results["torch"]["best_img_s"]

    print(f"{'backend':<11}{'img/s':>9}{'x torch':>9}{'best img/s':>11}{'x torch':>9}{'1st batch s':>12}  extra")
    for b, r in results.items():
        if "img_s" not in r:
            print(f"{b:<11}  {r.get('error', '')}")
            continue
        extra = ", ".join(f"{k}={r[k]:.1f}" for k in ("init_s", "convert_s", "compile_s") if k in r)
        if "device_stage_share" in r:
            extra += f", device_stage={100 * r['device_stage_share']:.0f}% of the epoch"
        print(f"{b:<11}{r['img_s']:>9.1f}{r.get('ratio_vs_torch', float('nan')):>9.2f}{r['best_img_s']:>11.1f}"
              f"{r.get('best_ratio_vs_torch', float('nan')):>9.2f}{r['first_batch_s']:>12.2f}  {extra}")
    payload = {
        "command": "python -m fastcl.bench loader " + " ".join(argv if argv is not None else []),
        "config": {k: v for k, v in vars(a).items()},
        "aug": ("two views, default AugSpec (MoCo-v2: RRC 0.2-1, flip, jitter .8, gray .2, blur .5) at --size"
                if a.aug == "default" else "two views, RRC 0.2-1 + flip only (colour ops off) at --size"),
        "timing": "median of repeats of one full drop_last epoch each, after one warm-up epoch per backend; "
                  "repeats interleaved across backends; per-epoch start-up included; "
                  "img/s = source images per second (each yields two views)",
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    write_evidence(name, payload, a.out)
    return payload
