"""Loader-only throughput and CPU cost: `python -m fastcl.bench loader --backend all --data FOLDER ...`

What is timed: one repeat = one full epoch (drop_last) of the Loader protocol over `--batches` batches of
`--batch` source images (the first batches*batch ids of the folder, via data.max_samples), every batch
yielding the `--views` views (default two of `--size` px; e.g. `2x224+6x96`: two global crops with the AugSpec's
scale and six 96 px local crops of scale 0.05-0.14) with the default (MoCo-v2) AugSpec, normalized, on `--device`.
img/s counts SOURCE images. Reported per backend:
- `img_s` (headline): all images of the epoch over its wall time, per-epoch start-up included (worker
  restart, DALI pipeline build, ffcv producer start), as a trainer sees it; make epochs long enough
  (`--batches`) that the start-up is amortized as in real training;
- `cpu_ms_per_img` (headline): CPU time of the process (all its threads: ffcv's numba threads, DALI's) plus
  its child processes (torch workers, live or reaped) during the epoch, per source image: the core-milliseconds
  a GPU node pays per image; `cores_at(R)` = cpu_ms_per_img * R / 1000 cores to feed R img/s;
- `best_img_s`: the fastest repeat, the least disturbed one when other jobs share the machine;
- `first_batch_s`: that start-up (time to the first batch);
- `init_s`: building the loader; ffcv also `convert_s` (folder -> .beton, when --beton is not given) and
  `compile_s` (its first, JIT-compiling epoch, which is excluded from every timed repeat).
Backends: torch, ffcv (data.ffcv_decode=once: one decode per image), ffcv_per_view (one decode per view,
ffcv's stock decoders), ffcv_dct (once + libjpeg-turbo DCT-scaled decodes where no crop gets upsampled;
`dct_reduced_share` = share of decodes made at n/8 < 1), dali, gpu_tensor.
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

from fastcl.lab.benchmarks.common import sync, write_evidence

BACKENDS = ("torch", "ffcv", "ffcv_per_view", "ffcv_dct", "dali", "gpu_tensor")
ALL_DEFAULT = ("torch", "ffcv", "ffcv_per_view", "dali", "gpu_tensor")  # --backend all (ffcv_dct on request)
# registry backend and data.ffcv_decode of each benchmarked variant
VARIANTS = {"ffcv": ("ffcv", "once"), "ffcv_per_view": ("ffcv", "per_view"), "ffcv_dct": ("ffcv", "once")}
# --aug crop_flip: no colour op at all, to time decode + crop + flip (+ normalize) alone
CROP_FLIP = {"jitter_p": 0, "gray_p": 0, "blur_p": 0, "solarize_p": 0}
LOCAL_SCALE = (0.05, 0.14)  # multi-crop local views (SwAV / SANE's 96 px crops)


def parse_views(spec: str, size: int) -> list[dict]:
    """'2x224+6x96' -> ViewSpec overrides; the first group keeps the AugSpec's scale, later groups are local
    crops (LOCAL_SCALE). '' -> two views of `size`."""
    groups = [g.split("x") for g in (spec or f"2x{size}").split("+")]
    out = []
    for i, (n, s) in enumerate(groups):
        out += [{"size": int(s)} if i == 0 else {"size": int(s), "scale": list(LOCAL_SCALE)}] * int(n)
    return out


def _cfg(backend: str, path: str, a: argparse.Namespace):
    from fastcl.config import load_config

    small = max(v["size"] for v in a.view_list) <= 64
    mean, std = ("[0.4914,0.4822,0.4465]", "[0.247,0.2435,0.2616]") if small else \
        ("[0.485,0.456,0.406]", "[0.229,0.224,0.225]")
    views = [{**v, **(CROP_FLIP if a.aug == "crop_flip" else {})} for v in a.view_list]
    name, decode = VARIANTS.get(backend, (backend, "once"))
    return load_config(None, [f"data.backend={name}", f"data.path={path}", f"optim.batch_size={a.batch}",
                              "data.drop_last=true", f"data.workers={a.workers}", f"data.max_samples={a.n}",
                              f"data.ffcv_decode={decode}", f"data.aug.views={views}",
                              f"data.aug.mean={mean}", f"data.aug.std={std}", f"trainer.seed={a.seed}"])


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process (all its threads), seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                out += kids
                todo += kids
        except OSError:
            continue
    return out


def cpu_seconds() -> dict:
    """CPU seconds so far: this process (every thread), its reaped children (os.times), and its live descendants
    by pid (/proc: persistent DataLoader workers are never reaped during a run). Differences of two calls give
    the CPU an interval cost, as long as no child ends in between without being reaped."""
    t = os.times()
    live = {p: _proc_cpu_s(p) for p in _descendants(os.getpid())}
    return {"self": t.user + t.system, "reaped": t.children_user + t.children_system, "live": live}


def cpu_delta(a: dict, b: dict) -> float:
    """CPU seconds spent between two `cpu_seconds()` samples (a live child that ended and was reaped in between
    moves from `live` to `reaped`; its pre-interval time is subtracted once)."""
    live = sum(v - a["live"].get(p, 0.0) for p, v in b["live"].items())
    gone = sum(v for p, v in a["live"].items() if p not in b["live"])
    return (b["self"] - a["self"]) + (b["reaped"] - a["reaped"] - gone) + live


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
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    t_first, n, dct = None, 0, []
    for b in loader:
        sync(device)
        n += len(b.index)
        meta = getattr(loader, "last_meta", None)
        if meta is not None:  # ffcv decode=once: the DCT numerator each view was cut at
            from fastcl.pipelines.ffcv_multicrop import view_boxes
            dct.append(view_boxes(meta)[:, :, 5].amin(1))
        if t_first is None:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    cpu = cpu_delta(c0, cpu_seconds())
    out = {"first_batch_s": (t_first or t_end) - t0, "total_s": t_end - t0, "images": n, "img_s": n / (t_end - t0),
           "cpu_s": cpu, "cpu_ms_per_img": 1000.0 * cpu / max(n, 1), "device_stage_s": _STAGE["s"]}
    if dct:
        out["dct_reduced_share"] = float((torch.cat(dct) < 8).float().mean())
    return out


def _time_embed_pass(backend: str, path: str, a: argparse.Namespace) -> dict:
    """One un-augmented eval-transform pass (`eval.features._source`, as `embed_dataset` reads, no network) over
    the benchmark's images at the largest view size: img/s and CPU ms per image."""
    from fastcl.eval.features import _source

    size = max(v["size"] for v in a.view_list)
    cfg = _cfg(backend, path, a)
    cfg.data.aug.eval_size = size
    c0, t0 = cpu_seconds(), time.perf_counter()
    n_img = 0
    n, it = _source(cfg, None, None, a.batch, 0, 1)
    for x, ids in it:
        n_img += len(ids)
    t = time.perf_counter() - t0
    cpu = cpu_delta(c0, cpu_seconds())
    return {"img_s": n_img / t, "cpu_ms_per_img": 1000.0 * cpu / max(n_img, 1), "images": n_img}


def _build(backend: str, a: argparse.Namespace, tmp: str) -> tuple[object, dict]:
    from fastcl.pipelines import build_loader

    info: dict = {}
    path = a.data
    if backend.startswith("ffcv"):
        path = a.beton or os.path.join(tmp, "bench.beton")
        if not os.path.exists(path):  # converted once, shared by the ffcv variants
            from fastcl.pipelines.convert import convert

            t0 = time.perf_counter()
            m = convert(a.data, path, write_mode=a.ffcv_write_mode, jpeg_quality=a.ffcv_jpeg_quality,
                        max_samples=a.n, workers=a.workers, progress=False)
            info.update(convert_s=time.perf_counter() - t0, beton_bytes=m["bytes"])
        info["beton"] = path
    t0 = time.perf_counter()
    cfg = _cfg(backend, path, a)
    if backend == "ffcv_dct":  # not a config option: the loader's constructor flag
        from fastcl.pipelines.ffcv_loader import FFCVLoader

        d = cfg.data
        loader = FFCVLoader(path, list(d.aug.views), d.aug.mean, d.aug.std, a.batch, 0, 1, a.device, a.seed,
                            d.workers, d.shuffle, d.drop_last, d.max_samples, decode="once", dct_scale=True)
    else:
        loader = build_loader(cfg, 0, 1, a.device)
    info["init_s"] = time.perf_counter() - t0
    if len(loader) == 0:
        raise SystemExit(f"{backend}: 0 batches of {a.batch} from {path} ({loader.num_samples} samples)")
    return loader, info


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fastcl.bench loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default=["all"], nargs="+", choices=(*BACKENDS, "all"),
                   help=f"one or more; all = {' '.join(ALL_DEFAULT)}")
    p.add_argument("--data", required=True, help="image folder (class sub-folders or flat)")
    p.add_argument("--beton", default="", help="ffcv: .beton of --data (default: convert --data into a temp file)")
    p.add_argument("--ffcv-write-mode", default="jpg", choices=("jpg", "raw", "smart", "proportion"),
                   help="when converting for ffcv")
    p.add_argument("--ffcv-jpeg-quality", type=int, default=90)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32, help="side of both views (without --views)")
    p.add_argument("--views", default="", help="e.g. 2x224+6x96: N x side groups; groups after the first are "
                                               f"local crops of scale {LOCAL_SCALE[0]}-{LOCAL_SCALE[1]}")
    p.add_argument("--embed-pass", action="store_true",
                   help="also time the eval-transform embedding pass (embed_dataset's reader) of torch, ffcv, dali")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine shared with other jobs)")
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
    a.view_list = parse_views(a.views, a.size)
    backends = list(ALL_DEFAULT) if "all" in a.backend else list(dict.fromkeys(a.backend))
    name = a.name or f"loader_{os.path.basename(os.path.normpath(a.data))}_{a.views or a.size}"

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
            if b.startswith("ffcv"):
                info[b]["compile_s"] = w["total_s"]
        runs = {b: [] for b in loaders}
        for r in range(a.repeats):
            for b, ld in loaders.items():
                runs[b].append(_time_epoch(ld, r + 1, a.device))
        embed = {}
        if a.embed_pass:
            sources = {b: info[b].get("beton", a.data) for b in ("torch", "ffcv", "dali") if b in loaders}
            for b, path in sources.items():  # warm-up (ffcv: the center-crop decoder's JIT compile)
                _time_embed_pass(b, path, a)
            for _ in range(a.repeats):
                for b, path in sources.items():
                    embed.setdefault(b, []).append(_time_embed_pass(b, path, a))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results = {}
    for b, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in ("img_s", "first_batch_s", "cpu_ms_per_img")}
        med["cores_at_2600_img_s"] = med["cpu_ms_per_img"] * 2600 / 1000  # ResNet-50 two-view step, one H100
        med["cores_at_30000_img_s"] = med["cpu_ms_per_img"] * 30000 / 1000  # CIFAR ResNet-18
        if "dct_reduced_share" in rs[0]:
            med["dct_reduced_share"] = statistics.median(x["dct_reduced_share"] for x in rs)
        med["best_img_s"] = max(x["img_s"] for x in rs)  # least disturbed repeat on a shared machine
        if a.profile:
            med["device_stage_share"] = statistics.median(x["device_stage_s"] / x["total_s"] for x in rs)
        results[b] = {**info[b], **med, "runs": rs}
    for b in info:
        results.setdefault(b, info[b])
    for b, rs in embed.items():
        results[b]["embed_pass"] = {"img_s": statistics.median(x["img_s"] for x in rs),
                                    "cpu_ms_per_img": statistics.median(x["cpu_ms_per_img"] for x in rs), "runs": rs}
    base = results.get("torch", {}).get("img_s")
    for b, r in results.items():
        if base and "img_s" in r:
            r["ratio_vs_torch"] = r["img_s"] / base
            r["best_ratio_vs_torch"] = r["best_img_s"] / results["torch"]["best_img_s"]
            r["cpu_ratio_vs_torch"] = r["cpu_ms_per_img"] / results["torch"]["cpu_ms_per_img"]
    per_view = results.get("ffcv_per_view", {})
    for b in ("ffcv", "ffcv_dct"):
        if "img_s" in results.get(b, {}) and "img_s" in per_view:
            results[b]["ratio_vs_ffcv_per_view"] = results[b]["img_s"] / per_view["img_s"]
            results[b]["cpu_ratio_vs_ffcv_per_view"] = results[b]["cpu_ms_per_img"] / per_view["cpu_ms_per_img"]

    print(f"{'backend':<14}{'img/s':>9}{'x torch':>9}{'best img/s':>11}{'x torch':>9}{'CPU ms/img':>11}"
          f"{'x torch':>9}{'1st batch s':>12}  extra")
    for b, r in results.items():
        if "img_s" not in r:
            print(f"{b:<14}  {r.get('error', '')}")
            continue
        extra = ", ".join(f"{k}={r[k]:.1f}" for k in ("init_s", "convert_s", "compile_s") if k in r)
        if "device_stage_share" in r:
            extra += f", device_stage={100 * r['device_stage_share']:.0f}% of the epoch"
        if "ratio_vs_ffcv_per_view" in r:
            extra += f", x per_view={r['ratio_vs_ffcv_per_view']:.2f}"
        if "dct_reduced_share" in r:
            extra += f", dct_reduced={100 * r['dct_reduced_share']:.0f}%"
        if "embed_pass" in r:
            extra += f", embed pass {r['embed_pass']['img_s']:.0f} img/s {r['embed_pass']['cpu_ms_per_img']:.2f} ms"
        print(f"{b:<14}{r['img_s']:>9.1f}{r.get('ratio_vs_torch', float('nan')):>9.2f}{r['best_img_s']:>11.1f}"
              f"{r.get('best_ratio_vs_torch', float('nan')):>9.2f}{r['cpu_ms_per_img']:>11.2f}"
              f"{r.get('cpu_ratio_vs_torch', float('nan')):>9.2f}{r['first_batch_s']:>12.2f}  {extra}")
    payload = {
        "command": "python -m fastcl.bench loader " + " ".join(argv if argv is not None else []),
        "config": {k: v for k, v in vars(a).items()},
        "views": a.view_list,
        "aug": ("default AugSpec (MoCo-v2: RRC, flip, jitter .8, gray .2, blur .5) on every view"
                if a.aug == "default" else "RRC + flip only (colour ops off) on every view"),
        "timing": "median of repeats of one full drop_last epoch each, after one warm-up epoch per backend; "
                  "repeats interleaved across backends; per-epoch start-up included; "
                  "img/s = source images per second (each yields all views); cpu_ms_per_img = CPU time of the "
                  "process (all threads) + its child processes (live and reaped) over the epoch / images",
        "note": a.note,
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    write_evidence(name, payload, a.out)
    return payload
