"""Step throughput per method on synthetic data (the compute-only ceiling) and each method's extra cost over
MoCo-v2, all measured in ONE process with the same network and batch:

    python -m fastcl.bench step [--method sce ifnd ...] [--backend synthetic] [--config configs/exp/cifar10_mocov2.yaml] [key=value ...]
    python -m fastcl.bench step --compare-per-pair --config configs/exp/imagenet_sce_multicrop.yaml ...

Every result reports the images the step encodes per sample (student / teacher, counted at the forward) and the
module calls per step. --compare-per-pair also times the pre-encode-once engine (fastcl/lab/benchmarks/per_pair.py,
one forward per (query, key) pair) in the same rounds: "before vs after in one run".

Timing: warm-up steps first (allocator, numba JIT, cuDNN autotune: excluded), then `--repeats` rounds that each
time `--steps` consecutive train steps of every method in turn (round-robin, so slow drifts of the machine hit all
methods alike); medians over rounds; CUDA synchronized around each measured block.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from fastcl.lab.benchmarks.common import sync, write_evidence
from fastcl.config import load_config, to_yaml
from fastcl.methods import METHODS
from fastcl.optim import set_lr_wd
import fastcl.step as step_mod
from fastcl.lab.benchmarks.per_pair import per_pair_step
from fastcl.step import train_step
from fastcl.train import make_accelerator, setup

_TIMED = {
    "simclr": ["method.name=simclr", "method.queue_size=0"],
    "mocov2": ["method.name=mocov2"],
    "sce": ["method.name=sce"],
    "ifnd": ["method.name=ifnd", "method.ifnd.warmup_epochs=0", "method.ifnd.accept_start=1.0",
             "method.ifnd.levels=[10,20,40]"],
    "sepp": ["method.name=sepp", "method.sepp.mode=multi"],
    "sane": ["method.name=sane", "method.batch_negatives=true"],
    "oracle": ["method.name=oracle"],
}
# every registered method: the ones above with settings that make their extra work happen in the timed steps,
# any other with its own defaults
EXTRA = {name: _TIMED.get(name, [f"method.name={name}"]) for name in ["mocov2", *METHODS]}


def _sepp_table(cfg, path: str) -> None:
    """A neighbour table for SePP's timed steps: from the synthetic images' pixels, or random features for a
    real loader (only its shape matters for timing)."""
    from fastcl.mining.miner import NeighbourMiner
    from fastcl.pipelines import build_loader
    loader = build_loader(cfg, 0, 1, "cpu")
    n = loader.num_samples
    if hasattr(loader, "images"):
        emb = F.normalize(torch.cat([loader.images(torch.arange(i, min(i + 512, n)), 8).flatten(1)
                                     for i in range(0, n, 512)]), dim=1)
    else:
        emb = F.normalize(torch.randn(n, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    miner = NeighbourMiner(n, 5, 0.0)
    miner.mine(emb)
    miner.save(path)


def build(config: str, method: str, overrides: list[str], scratch: str, backend: str = "synthetic"):
    """The method's train-step parts on `backend`'s data; `scratch` holds the SePP table (nothing is written to
    the run directory: only setup() runs)."""
    over = [f"data.backend={backend}", "trainer.progress=false", "trainer.knn_every=0",
            f"trainer.run_dir={os.path.join(scratch, 'run')}",
            f"method.sepp.table_path={os.path.join(scratch, 'sepp.npz')}"] + EXTRA[method] + overrides
    cfg = load_config(config, over)
    parts, loader, sched, state, _, _ = setup(cfg, make_accelerator(cfg))
    parts.timer = None  # measure the step alone
    return cfg, parts, loader, sched


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/exp/cifar10_mocov2.yaml")
    ap.add_argument("--methods", "--method", nargs="+", default=list(EXTRA), choices=list(EXTRA),
                    help="methods to time in one process (MoCo-v2 included: the extra cost is measured against it)")
    ap.add_argument("--backend", default="synthetic",
                    help="synthetic (compute-only ceiling, default) or a real loader (torch, gpu_tensor, ffcv, dali; "
                         "give data.path=...): the step then includes waiting for its batches")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compare-per-pair", action="store_true",
                    help="also time every method with one forward per (query, key) pair (the engine before encode-once)")
    ap.add_argument("--vary", default=None, metavar="KEY=V1,V2",
                    help="time every method once per value of one config key in the same rounds (e.g. "
                         "model.bn_splits=1,8: split BN against plain BN); results are named METHOD[KEY=V]")
    ap.add_argument("--name", default=None, help="evidence file name (default step_<device>)")
    ap.add_argument("--out", default="docs/benchmarks", help="evidence folder")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastcl_bench_step.") as scratch:
        return _run(a, scratch)


def _run(a, scratch: str) -> dict:
    base = load_config(a.config, [f"data.backend={a.backend}"] + a.overrides)
    if "mocov2" not in a.methods:  # the reference of every "extra cost" number
        a.methods = ["mocov2"] + list(a.methods)
    if "sepp" in a.methods:
        _sepp_table(base, os.path.join(scratch, "sepp.npz"))
    runs = {}
    engines = [("", train_step)] + ([("@per_pair", per_pair_step)] if a.compare_per_pair else [])
    variants = [("", [])]
    if a.vary:
        key, _, values = a.vary.partition("=")
        variants = [(f"[{key}={v}]", [f"{key}={v}"]) for v in values.split(",")]
    for m, (tag, vary), (suffix, fn) in itertools.product(a.methods, variants, engines):
        torch.manual_seed(0)
        cfg, parts, loader, sched = build(a.config, m, a.overrides + vary, scratch, a.backend)
        r = runs[m + tag + suffix] = dict(cfg=cfg, parts=parts, sched=sched, next=_endless(loader).__next__,
                                          step=0, fn=fn)
        if m == "ifnd":  # fill the table, then cluster once so elimination is active in the timed steps
            for _ in range(max(a.warmup, len(loader))):
                _one(r)
            parts.method.on_epoch_start(1, parts.services)
    for r in runs.values():
        for _ in range(a.warmup):
            _one(r)
    encoded = {m: _count_encoded(r) for m, r in runs.items()}
    times = {m: [] for m in runs}
    for _ in range(a.repeats):
        for m, r in runs.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                _one(r)
            sync()
            times[m].append((time.perf_counter() - t0) / a.steps)
    gb = base.optim.batch_size
    res = {m: {"median_s_per_step": statistics.median(t), "img_per_s": gb / statistics.median(t), "times": t,
               **encoded[m]} for m, t in times.items()}
    for m in res:
        tag = m[m.index("["):m.index("]") + 1] if "[" in m else ""
        ref = res["mocov2" + tag + ("@per_pair" if m.endswith("@per_pair") else "")]
        res[m]["extra_vs_mocov2_pct"] = 100 * (res[m]["median_s_per_step"] / ref["median_s_per_step"] - 1)
        if m + "@per_pair" in res:  # before (one forward per pair) / after (every view once), same rounds
            res[m]["speedup_vs_per_pair"] = res[m + "@per_pair"]["median_s_per_step"] / res[m]["median_s_per_step"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{'method':24s} {'s/step':>9s} {'img/s':>9s} {'vs MoCo-v2':>11s} {'student/teacher img per sample':>31s} "
          f"{'fwds':>7s} {'vs per-pair':>11s}")
    for m, r in res.items():
        sp = f"{r['speedup_vs_per_pair']:10.2f}x" if "speedup_vs_per_pair" in r else ""
        print(f"{m:24s} {r['median_s_per_step']:9.4f} {r['img_per_s']:9.1f} {r['extra_vs_mocov2_pct']:+10.1f}% "
              f"{r['student_images_per_sample']:15.1f} / {r['teacher_images_per_sample']:<13.1f} "
              f"{r['student_forwards_per_step']:3d}+{r['teacher_forwards_per_step']:<3d} {sp}")
    write_evidence(a.name or f"step_{dev}", {"config": to_yaml(base), "global_batch": gb, "steps": a.steps,
                                              "warmup": a.warmup, "repeats": a.repeats, "results": res,
                                              "timing": "perf_counter around --steps consecutive steps, CUDA synced"},
                   a.out)
    return res


def _endless(loader):
    """The loader's batches, epoch after epoch (each run draws from its own loader)."""
    while True:
        yield from loader


def _one(r: dict) -> None:
    s = r["step"] % len(r["sched"]["lr"])
    sc = {k: v[s] for k, v in r["sched"].items()}
    set_lr_wd(r["parts"].optimizer, float(sc["lr"]), float(sc["wd"]))
    r["fn"](r["parts"], r["next"](), sc, s)
    r["step"] += 1


def _count_encoded(r: dict) -> dict:
    """One (untimed) step with every forward counted (fastcl.step.count_forwards): images per sample through the
    student and the teacher, and forwards (size groups) of each."""
    b = {}
    batch = r["next"]
    r["next"] = lambda: b.setdefault("x", batch())
    try:
        with step_mod.count_forwards() as c:
            _one(r)
    finally:
        r["next"] = batch
    n = b["x"].views[0].shape[0]
    return {"student_images_per_sample": c["student"] / n, "teacher_images_per_sample": c["teacher"] / n,
            "student_forwards_per_step": c["student_forwards"], "teacher_forwards_per_step": c["teacher_forwards"]}
