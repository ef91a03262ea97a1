"""One device check: every part of fastcl that behaves differently on a GPU, run once, each stage isolated.

    python -m fastcl.lab.gpucheck [--out DIR] [--size toy|full] [--stages env kernels ...] [--timeout-s N]

Stages, in order (each a small function below; docs/GPU.md says what each one proves):

| stage        | what runs on the device (CUDA when torch sees one, else the CPU)                                   |
|--------------|----------------------------------------------------------------------------------------------------|
| `env`        | device product name, torch / numba / accelerate versions, which optional packages import           |
| `kernels`    | the numba target kernels (numba.cuda on CUDA, njit on the CPU) against the torch reference          |
| `mining`     | torch k-means and kNN on the device against the CPU; faiss-gpu against torch when it has GPU support |
| `loader`     | the gpu_tensor loader and the device-stage augmentation against the same seed on the CPU            |
| `train`      | `fastcl.train.train()` for every registered method: checkpoint, stop after N steps, resume          |
| `monitor`    | the kNN monitor (random-init ResNet-18) on a small labelled CIFAR-10 folder, device vs CPU          |
| `compile`    | `trainer.compile=true` for a few steps                                                              |
| `throughput` | `fastcl.lab.benchmarks.step`: CIFAR ResNet-18 on gpu_tensor (img/s, data wait), ResNet-50 2x224 synthetic |
| `dali` `ffcv` | two epochs of those loaders over the labelled folder when the packages import                      |

Isolation: every stage runs inside its own try/except with its own time budget, cut to what is left of the total
budget (so a device command with a 10-minute limit always ends with the table; SIGALRM raises in the stage;
a stage stuck inside C code past its budget + 60 s ends the process through faulthandler, with the JSON already
naming that stage as the one that did not finish). A failing stage is reported with its error line and the next
stage runs. The results go to `<out>/gpucheck.json` (rewritten after every stage, so a killed run still leaves
them) as {stage: {status: pass|fail|skipped, reason, seconds, numbers}}, every stage's output (and a failing
stage's traceback) to `<out>/gpucheck.log`, and a table is printed; scratch files live in a temporary folder.
Exit code 0 when no stage failed (skipped is fine), 1 otherwise.

Sizes: `toy` is what CI runs on a 2-core CPU (tests/test_gpucheck.py; tiny networks and batches: under a minute
with warm numba / inductor caches, the first run on a machine compiles both); `full` is what a lent H100/H200 runs
(docs/GPU.md; sized for well under 8 minutes there: CIFAR-size real networks, a few seconds of timing each).
A stage skips ("needs CUDA", "not installed") only where no CPU form of it exists or its package is absent;
parts of a stage that need CUDA are named in its reason.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import faulthandler
import importlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from fastcl.lab import REPO as LAB_REPO

REPO = Path(LAB_REPO)
TINY = REPO / "configs" / "test" / "tiny.yaml"
CIFAR_R18 = REPO / "configs" / "exp" / "cifar10_mocov2.yaml"
IMAGENET_R50 = REPO / "configs" / "exp" / "imagenet_mocov2.yaml"
CIFAR_MEAN_STD = ["data.aug.mean=[0.4914,0.4822,0.4465]", "data.aug.std=[0.247,0.2435,0.2616]"]
HANG_GRACE_S = 60  # past budget + this, a stage stuck in C code (a CUDA hang) ends the process


class Skip(Exception):
    """Raised by a stage that cannot run here (no CUDA form on a CPU machine, package not installed)."""


class StageTimeout(BaseException):
    """Raised in a stage by SIGALRM at the end of its budget. A BaseException so that a stage's own
    `except Exception` around a sub-part cannot swallow it."""


@dataclass
class Size:
    """Everything that differs between the CPU toy run and the full run on a lent GPU."""
    budgets: dict[str, int]           # seconds per stage
    total_s: int                      # seconds for all stages: the device command's 600 s limit must see the table
    cifar_per_class: tuple[int, int]  # CIFAR-10 images per class (train, test) of the labelled folder
    kernel_shape: tuple[int, int]     # rows x columns of the kernel comparison
    mining: dict                      # points, dim, clusters, kNN queries and k
    loader_batch: int
    train: list[str]                  # overrides of configs/test/tiny.yaml for the train / compile stages
    train_stop_at: int                # the simulated kill: steps of the first run (of 2 epochs)
    monitor_width: int
    cifar_bench: list[str]            # overrides of configs/exp/cifar10_mocov2.yaml
    r50_bench: list[str]              # overrides of configs/exp/imagenet_mocov2.yaml
    bench: dict                       # fastcl.bench step timing: steps, warmup, repeats
    tarballs: list[str] = field(default_factory=list)  # CIFAR-10 JPEG tarballs, first found wins
    demo: list[str] = field(default_factory=list)  # overrides of configs/exp/cifar10_moco_demo.yaml
    demo_epochs: int = 1  # epochs of the MoCo demo whose kNN is put beside the published curve
    demo_full_data: bool = False  # all 50k / 10k CIFAR-10 images (the published curve's data) or the toy folder


# The shared data folder beside the repository (FASTCL_SHARED_DATA overrides, as in tests/conftest.py).
SHARED = Path(os.environ.get("FASTCL_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLE_TARBALL = str(REPO / "data" / "cifar10_sample.tar.gz")         # 500 + 100 per class, in the repo
FULL_TARBALLS = [str(REPO / "data" / "gpu_carry" / "cifar10-jpeg.tar.gz"),  # carried to a GPU machine
                 str(SHARED / "cifar10-jpeg" / "cifar10-jpeg.tar.gz")]

SIZES = {
    "toy": Size(
        budgets=dict(env=60, kernels=120, mining=60, loader=60, train=150, monitor=60, compile=180,
                     throughput=120, dali=90, ffcv=120, moco_demo=120), total_s=600,
        cifar_per_class=(20, 10), kernel_shape=(64, 4096),
        mining=dict(n=2000, dim=32, k=10, queries=500, knn_k=10), loader_batch=16,
        train=[], train_stop_at=3, monitor_width=8,
        cifar_bench=["model.width=8", "optim.batch_size=32", "method.queue_size=128", "data.workers=2"],
        r50_bench=["model.width=8", "optim.batch_size=8", "method.queue_size=64", "data.num_samples=256"],
        bench=dict(steps=2, warmup=1, repeats=2),
        tarballs=[SAMPLE_TARBALL] + FULL_TARBALLS,
        demo=["model.width=8", "optim.batch_size=32", "method.queue_size=128"], demo_epochs=1),
    "full": Size(
        budgets=dict(env=60, kernels=120, mining=90, loader=60, train=150, monitor=90, compile=240,
                     throughput=180, dali=90, ffcv=120, moco_demo=200), total_s=540,
        cifar_per_class=(1000, 200), kernel_shape=(256, 65536),
        mining=dict(n=100_000, dim=128, k=100, queries=10_000, knn_k=20), loader_batch=256,
        # CIFAR-size images and the real ResNet-18 width; 8 steps per epoch
        train=["model.width=64", "data.aug.views.0.size=32", "data.aug.views.1.size=32", "data.aug.eval_size=32",
               "data.num_samples=512", "optim.batch_size=64", "method.queue_size=256"],
        train_stop_at=11, monitor_width=64,
        cifar_bench=[f"data.workers={min(8, os.cpu_count() or 1)}"],  # batch 512, queue 4096 of the config
        # the recipe's 65,536-key queue needs a larger synthetic dataset (generated per id: no memory per sample)
        r50_bench=["optim.batch_size=256", "data.num_samples=131072"],
        bench=dict(steps=10, warmup=5, repeats=3),
        tarballs=FULL_TARBALLS + [SAMPLE_TARBALL],
        demo=[f"data.workers={min(8, os.cpu_count() or 1)}"], demo_epochs=8, demo_full_data=True),
}


@dataclass
class Ctx:
    """What every stage gets: the size, the output folder, a scratch folder and the device under test."""
    size_name: str
    out: str
    device: torch.device
    work: str  # scratch (run directories, the .beton): a temporary folder, removed at the end
    _cifar: str | None = None

    @property
    def size(self) -> Size:
        return SIZES[self.size_name]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def workers(self) -> int:
        """Decode threads / worker processes: 2 on the CPU toy run, up to 8 on a GPU machine's 16 cores."""
        return 2 if self.size_name == "toy" else min(8, os.cpu_count() or 1)

    def cifar(self) -> str:
        """Root of a labelled CIFAR-10 JPEG folder (train/<class>/, test/<class>/), extracted once."""
        if self._cifar is None:
            self._cifar = extract_cifar(self.size.tarballs, self.size.cifar_per_class, self.size_name)
        return self._cifar


# ------------------------------------------------------------------------------------------------ helpers

def extract_cifar(tarballs: list[str], per_class: tuple[int, int], tag: str) -> str:
    """The first `per_class` (train, test) images of every class of the first tarball found, extracted once into
    data/extracted/gpucheck_<tag>_<tarball> (fastcl.pipelines.extract: a folder appears only complete)."""
    from fastcl.pipelines.extract import extract_once

    found = [t for t in tarballs if os.path.isfile(t)]
    if not found:
        raise FileNotFoundError(f"no CIFAR-10 JPEG tarball found (looked for {', '.join(tarballs)})")
    limit = {"train": per_class[0], "test": per_class[1]}

    def keep(rest: str) -> bool:  # rest = "train/cat/0042.jpg"; file names are the rank in the original order
        parts = rest.split("/")
        stem = parts[-1].split(".")[0]
        return len(parts) == 3 and stem.isdigit() and int(stem) < limit.get(parts[0], 0)

    name = os.path.basename(found[0]).split(".")[0]
    return extract_once(found[0], str(REPO / "data" / "extracted" / f"gpucheck_{tag}_{name}"), keep=keep)


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def try_import(module: str) -> tuple[bool, str]:
    """(importable, version or the error line)."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # an optional package may fail with any error (missing CUDA libraries, ABI)
        return False, error_line(e)
    return True, str(getattr(mod, "__version__", "imported"))


def error_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max()) if a.numel() else 0.0


def check(cond: bool, what: str) -> None:
    """A stage's assertion: raises with `what` as the error line (assert statements vanish under -O)."""
    if not cond:
        raise AssertionError(what)


def precision_overrides(ctx: Ctx) -> list[str]:
    """bf16 + channels_last on CUDA (what GPU runs use), fp32 on the CPU."""
    return ["trainer.precision=bf16", "trainer.channels_last=true"] if ctx.cuda else ["trainer.precision=fp32"]


def cifar_overrides(root: str, backend: str, batch: int, workers: int = 2) -> list[str]:
    """A config for the labelled CIFAR folder at 32 px with CIFAR statistics."""
    return [f"data.backend={backend}", f"data.path={root}/train", f"optim.batch_size={batch}",
            f"data.workers={workers}", "data.aug.views.0.size=32", "data.aug.views.1.size=32",
            "data.aug.eval_size=32", "data.aug.eval_resize_ratio=1.0", *CIFAR_MEAN_STD]


def first_batches(loader, n: int) -> list:
    loader.set_epoch(0)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def check_batch(batch, size: int, num_samples: int) -> None:
    """Every view [B,3,size,size] finite, ids unique and in range."""
    for v in batch.views:
        check(tuple(v.shape[1:]) == (3, size, size), f"view shape {tuple(v.shape)}, expected [B,3,{size},{size}]")
        check(bool(torch.isfinite(v).all()), "non-finite pixels in a view")
    ids = batch.index.cpu()
    check(len(set(ids.tolist())) == len(ids), "repeated sample ids in one batch")
    check(int(ids.min()) >= 0 and int(ids.max()) < num_samples, "sample id out of range")


# ------------------------------------------------------------------------------------------------ stages
# Each stage takes the Ctx and returns (numbers, note): numbers go to the JSON, the note (parts that were
# skipped, the headline numbers) to the reason column. Skip(...) skips the whole stage; any other exception
# fails it.

def stage_env(ctx: Ctx) -> tuple[dict, str]:
    from fastcl.lab.benchmarks.common import git_commit, hardware

    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu"
    optional = {m: try_import(m) for m in ("faiss", "ffcv", "nvidia.dali", "PIL")}
    faiss_gpus = 0
    if optional["faiss"][0]:
        from fastcl.mining.engine import faiss_num_gpus
        faiss_gpus = faiss_num_gpus()
    numbers = {"device": name, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
               "numba": version("numba"), "numba_cuda": version("numba-cuda"), "accelerate": version("accelerate"),
               "python": sys.version.split()[0], "commit": git_commit(), "hardware": hardware(),
               "imports": {m: {"ok": ok, "detail": d} for m, (ok, d) in optional.items()},
               "faiss_gpu": faiss_gpus > 0, "faiss_num_gpus": faiss_gpus}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        numbers.update(capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                       numba_cuda_usable=numba_cuda_usable())
    check(numbers["numba"] != "not installed" and numbers["accelerate"] != "not installed",
          "numba and accelerate are core dependencies and must be installed")
    have = [m for m, (ok, _) in optional.items() if ok] + (["faiss-gpu"] if faiss_gpus else [])
    return numbers, f"{name}; torch {torch.__version__}; imports: {', '.join(have) or 'none'}"


def numba_cuda_usable() -> bool:
    from fastcl.kernels import choose_backend
    return choose_backend("auto", torch.zeros(1, device="cuda")) == "cuda"


def stage_kernels(ctx: Ctx) -> tuple[dict, str]:
    """The kernels of `python -m fastcl.bench kernels`, each against the torch reference on the same inputs, to
    the tolerance of tests/test_kernels.py: numba.cuda on CUDA tensors, numba njit on CPU tensors."""
    from fastcl.lab.benchmarks.kernels import _calls, _inputs
    from fastcl.kernels import reference

    if ctx.cuda:
        if not numba_cuda_usable():
            raise AssertionError("torch sees a GPU but numba.cuda is not usable (install numba-cuda)")
        from fastcl.kernels import cuda as impl
        label, note = "numba_cuda", "numba.cuda"
    else:
        from fastcl.kernels import cpu as impl
        label, note = "numba_cpu", "numba njit (numba.cuda: needs CUDA)"
    rows, cols = ctx.size.kernel_shape
    inputs = _inputs(rows, cols, 2, ctx.device.type)
    fast = _calls(impl, *inputs)  # the benchmark's set of calls: a kernel added there is checked here too
    numbers = {"backend": label, "shape": [rows, cols], "kernels": {}}
    for name, ref_fn in _calls(reference, *inputs).items():
        numbers["kernels"][name] = compare_kernel(ref_fn, fast[name], ctx.device)
    worst = max((k.get("max_abs_err", 0.0) for k in numbers["kernels"].values()), default=0.0)
    return numbers, f"{note}: {len(numbers['kernels'])} kernels match torch (max abs err {worst:.1e})"


def compare_kernel(ref_fn: Callable, fast_fn: Callable, device: torch.device) -> dict:
    """Errors of the kernel against the reference (raises beyond tests/test_kernels.py's tolerance) and one
    timed call of each after the first (numba cache load / JIT and CUDA module load are not timed)."""
    got, want = fast_fn(), ref_fn()
    if want.dtype == torch.bool:
        bad = int((got.cpu() != want.cpu()).sum())
        check(bad == 0, f"{bad} mask entries differ from the torch reference")
        row = {"mismatches": bad}
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
        row = {"max_abs_err": max_abs_diff(got, want)}
    for key, fn in (("torch_ms", ref_fn), ("kernel_ms", fast_fn)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        row[key] = round((time.perf_counter() - t0) * 1e3, 3)
    return row


def stage_mining(ctx: Ctx) -> tuple[dict, str]:
    """Spherical k-means and exact kNN with the torch engine on the device against the same calls on the CPU
    (same seed, so the same initial centroids), and faiss-gpu against them when faiss has GPU support."""
    from fastcl.lab.benchmarks.mining import make_data
    from fastcl.mining.engine import faiss_module, faiss_num_gpus

    m = ctx.size.mining
    x = make_data(m["n"], m["dim"], m["k"], seed=0)
    q = x[: m["queries"]]
    ref = mine_once(x, q, m, "torch", torch.device("cpu"))
    on_device = agreement(mine_once(x, q, m, "torch", ctx.device), ref)
    if not ctx.cuda:
        faiss_gpu = "skipped: needs CUDA"
    elif faiss_module() is None or faiss_num_gpus() == 0:
        faiss_gpu = "skipped: not installed"
    else:
        faiss_gpu = agreement(mine_once(x, q, m, "faiss-gpu", ctx.device), ref, kmeans_min=0.9)
    numbers = {"points": m["n"], "dim": m["dim"], "clusters": m["k"], f"torch_{ctx.device.type}": on_device,
               "faiss_gpu": faiss_gpu}
    return numbers, (f"torch on {ctx.device.type}: k-means agreement {on_device['kmeans_agree']:.3f}, kNN same ids "
                     f"{on_device['knn_same_ids']:.3f}; faiss-gpu: "
                     + (faiss_gpu if isinstance(faiss_gpu, str) else f"k-means {faiss_gpu['kmeans_agree']:.3f}"))


def mine_once(x: torch.Tensor, q: torch.Tensor, m: dict, backend: str, device: torch.device) -> dict:
    from fastcl.methods.ifnd import spherical_kmeans
    from fastcl.mining.knn import knn_search

    xd, qd = x.to(device), q.to(device)
    sync(device)
    t0 = time.perf_counter()
    km = spherical_kmeans(xd, m["k"], niter=10, seed=0, backend=backend, init="random")  # the check's init, as before
    sync(device)
    t1 = time.perf_counter()
    sims, ids = knn_search(qd, xd, m["knn_k"], backend=backend)
    sync(device)
    return {"assign": km.assign.cpu(), "sims": sims.cpu(), "ids": ids.cpu(), "kmeans_s": t1 - t0,
            "knn_s": time.perf_counter() - t1}


def agreement(got: dict, ref: dict, kmeans_min: float = 0.98) -> dict:
    """k-means: share of points with the same cluster id (same initial centroids, so ids are comparable);
    kNN: share of identical neighbour ids and the largest similarity difference."""
    km = float((got["assign"] == ref["assign"]).float().mean())
    nn = float((got["ids"] == ref["ids"]).float().mean())
    ds = max_abs_diff(got["sims"], ref["sims"])
    check(km >= kmeans_min, f"k-means assignments agree with the CPU on {km:.3f} of the points (< {kmeans_min})")
    check(nn >= 0.99 and ds < 1e-3, f"kNN: {nn:.3f} of the neighbour ids equal the CPU's, sims differ by {ds:.1e}")
    return {"kmeans_agree": round(km, 4), "knn_same_ids": round(nn, 4), "knn_max_sim_diff": ds,
            "kmeans_s": round(got["kmeans_s"], 3), "knn_s": round(got["knn_s"], 3)}


def stage_loader(ctx: Ctx) -> tuple[dict, str]:
    """The gpu_tensor loader on the device against the same loader on the CPU (same seed: the same crops,
    flips and colour draws, all drawn on the host), then the device stage alone with colour jitter and blur
    forced on, and the fast colour matrices against the op-by-op reference (no hue: the one intended
    difference)."""
    numbers = {"gpu_tensor_max_diff": gpu_tensor_vs_cpu(ctx)}
    numbers.update(device_stage_vs_cpu(ctx))
    tol = 1e-3
    bad = {k: v for k, v in numbers.items() if v > tol}
    check(not bad, f"device outputs differ from the CPU path by more than {tol}: {bad}")
    return numbers, (f"gpu_tensor + device stage on {ctx.device.type} vs CPU: max diff "
                     f"{max(numbers.values()):.1e}" + ("" if ctx.cuda else " (both CPU here)"))


def gpu_tensor_vs_cpu(ctx: Ctx) -> float:
    from fastcl.config import load_config
    from fastcl.pipelines import build_loader

    cfg = load_config(None, cifar_overrides(ctx.cifar(), "gpu_tensor", ctx.size.loader_batch, ctx.workers))
    got = first_batches(build_loader(cfg, 0, 1, ctx.device), 2)
    want = first_batches(build_loader(cfg, 0, 1, torch.device("cpu")), 2)
    worst = 0.0
    for g, w in zip(got, want):
        check(torch.equal(g.index.cpu(), w.index.cpu()) and torch.equal(g.label.cpu(), w.label.cpu()),
              "gpu_tensor: ids/labels differ between the device and the CPU")
        check_batch(g, 32, len(train_paths(ctx)))
        worst = max([worst] + [max_abs_diff(a, b) for a, b in zip(g.views, w.views)])
    return worst


def train_paths(ctx: Ctx) -> list[str]:
    from fastcl.pipelines.folder import scan_folder
    return scan_folder(os.path.join(ctx.cifar(), "train")).paths


def device_stage_vs_cpu(ctx: Ctx) -> dict:
    from fastcl.pipelines.augment import color_ops, color_ops_reference, device_stage
    from fastcl.pipelines.augspec import CIFAR10_MEAN, CIFAR10_STD, ViewSpec

    def gen() -> torch.Generator:  # a fresh generator per call: every call gets the same draws
        return torch.Generator().manual_seed(7)

    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    xd = x.to(ctx.device)
    spec = ViewSpec(jitter_p=1.0, blur_p=1.0, gray_p=0.2)
    stage_dev = device_stage(xd, spec, CIFAR10_MEAN, CIFAR10_STD, gen())
    stage_cpu = device_stage(x, spec, CIFAR10_MEAN, CIFAR10_STD, gen())
    no_hue = ViewSpec(jitter_p=1.0, hue=0.0, gray_p=0.2, blur_p=0.0)
    fast = color_ops(xd, no_hue, gen())
    ref = color_ops_reference(x, no_hue, gen())
    return {"device_stage_max_diff": max_abs_diff(stage_dev, stage_cpu),
            "color_fast_vs_reference_max_diff": max_abs_diff(fast, ref)}


def stage_train(ctx: Ctx) -> tuple[dict, str]:
    """fastcl.train.train() for every method of the registry at toy size: a first run stopped after
    `train_stop_at` steps (trainer.max_steps: the checkpoint it writes is all a killed run leaves), then
    `trainer.resume=auto` to the end of its 2 epochs. The resumed run must start from that checkpoint, end at
    the last step and log only finite losses."""
    from fastcl.methods import METHODS

    numbers, failed = {"methods": {}}, []
    for name, cls in METHODS.items():
        try:
            numbers["methods"][name] = train_one(ctx, name, cls)
        except Exception as e:  # one method's failure must not hide the others'
            numbers["methods"][name] = {"error": error_line(e)}
            failed.append(f"{name}: {error_line(e)}")
    check(not failed, "; ".join(failed))
    prec = "bf16 + channels_last" if ctx.cuda else "fp32"
    return numbers, f"{len(METHODS)} methods ({', '.join(METHODS)}) in {prec}: checkpoint, stop, resume, finite"


def method_overrides(ctx: Ctx, name: str, cls, run_dir: str) -> list[str]:
    """Toy-size overrides for a registered method, derived from its class and config section (no per-method
    list to forget): in-batch methods get no queue; a section with a `table_path` (a neighbour table mined
    offline) gets one mined here from the synthetic images' pixels."""
    over = [f"method.name={name}"]
    if cls.inbatch_only:
        over.append("method.queue_size=0")
    if cls.Config is not None and "table_path" in {f.name for f in dataclasses.fields(cls.Config)}:
        over.append(f"method.{cls.section}.table_path={pixel_table(ctx, run_dir)}")
    return over


def pixel_table(ctx: Ctx, run_dir: str) -> str:
    """A neighbour table (k=3, no threshold) of the toy synthetic images, mined from their pixels."""
    import torch.nn.functional as F

    from fastcl.config import load_config
    from fastcl.mining.miner import NeighbourMiner
    from fastcl.pipelines import build_loader

    cfg = load_config(str(TINY), ctx.size.train)
    loader = build_loader(cfg, 0, 1, "cpu")
    n = cfg.data.num_samples
    emb = F.normalize(loader.images(torch.arange(n), 16).flatten(1), dim=1)
    miner = NeighbourMiner(n, 3, 0.0)
    miner.mine(emb)
    path = run_dir + "_table.npz"
    miner.save(path)
    return path


def train_one(ctx: Ctx, name: str, cls) -> dict:
    from fastcl.config import load_config
    from fastcl.train import train

    run = os.path.join(ctx.work, "train", name)
    shutil.rmtree(run, ignore_errors=True)
    base = [*ctx.size.train, *precision_overrides(ctx), f"trainer.run_dir={run}", "trainer.trackers=[]",
            "trainer.knn_every=0", "trainer.progress=false", "trainer.epochs=2", "trainer.log_every=1",
            *method_overrides(ctx, name, cls, run)]
    stop_at = ctx.size.train_stop_at
    first = train(load_config(str(TINY), base + [f"trainer.max_steps={stop_at}"]))
    check(first.get("steps") == stop_at, f"{name}: the first run ended at step {first.get('steps')}, not {stop_at}")
    ckpts = sorted(os.listdir(os.path.join(run, "checkpoints")))
    check(any(c.startswith("step_") for c in ckpts), f"{name}: no checkpoint after the stopped run")
    resumed = train(load_config(str(TINY), base + ["trainer.resume=auto"]))
    logged = logged_losses(run)  # (step, loss) in file order: a resume that restarted would repeat steps
    steps, losses = [s for s, _ in logged], dict(logged)
    total = resumed.get("steps", 0)
    check(total > stop_at, f"{name}: the resumed run ended at step {total}")
    check(steps == list(range(1, total + 1)), f"{name}: logged steps {steps} are not 1..{total} once each")
    check(all(math.isfinite(v) for v in losses.values()), f"{name}: non-finite loss")
    return {"stopped_at": stop_at, "steps": total, "loss_at_stop": losses[stop_at], "final_loss": losses[total]}


def logged_losses(run: str) -> list[tuple[int, float]]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def stage_monitor(ctx: Ctx) -> tuple[dict, str]:
    """The training run's kNN monitor (the class train.py uses) on the labelled CIFAR folder with a
    random-init ResNet-18: on the device, then the same network on the CPU. Top-1 must agree to within two
    test images and beat chance (random-init features of real images do)."""
    from fastcl.config import load_config
    from fastcl.models import resnet
    from fastcl.pipelines.folder import scan_folder
    from fastcl.eval.monitor import KnnMonitor

    root = ctx.cifar()
    cfg = load_config(None, cifar_overrides(root, "torch", 64, ctx.workers)
                      + [f"data.eval_path={root}/test", "trainer.knn_every=1"])
    torch.manual_seed(0)
    net = resnet("resnet18", cifar_stem=True, width=ctx.size.monitor_width)
    monitor = KnnMonitor(cfg, True)
    t0 = time.perf_counter()
    got = monitor(net.to(ctx.device))
    seconds = time.perf_counter() - t0
    want = monitor(copy.deepcopy(net).cpu()) if ctx.cuda else got
    n_test = len(scan_folder(os.path.join(root, "test")).paths)
    chance = 100.0 / 10
    check(math.isfinite(got["knn_top1"]) and got["knn_top1"] > chance,
          f"kNN top-1 {got['knn_top1']:.2f} % is not above chance ({chance:.0f} %)")
    check(abs(got["knn_top1"] - want["knn_top1"]) <= 2 * 100.0 / n_test + 1e-9,
          f"kNN top-1 on {ctx.device.type} {got['knn_top1']:.2f} % vs CPU {want['knn_top1']:.2f} %")
    numbers = {"knn_top1": got["knn_top1"], "knn_top1_cpu": want["knn_top1"], "feature_rank": got["feature_rank"],
               "test_images": n_test, "seconds_on_device": round(seconds, 2)}
    return numbers, (f"random-init kNN top-1 {got['knn_top1']:.1f} % on {n_test} test images "
                     f"(CPU {want['knn_top1']:.1f} %)")


def stage_compile(ctx: Ctx) -> tuple[dict, str]:
    """trainer.compile=true (torch.compile of the student, in place) for a few steps of the toy run. On the CPU
    a missing C++ compiler (on CUDA a missing triton) is a skip naming the error; any other error fails."""
    from fastcl.config import load_config
    from fastcl.train import train

    run = os.path.join(ctx.work, "compile")
    shutil.rmtree(run, ignore_errors=True)
    over = [*ctx.size.train, *precision_overrides(ctx), f"trainer.run_dir={run}", "trainer.trackers=[]",
            "trainer.knn_every=0", "trainer.progress=false", "trainer.log_every=1", "trainer.max_steps=3",
            "trainer.compile=true"]
    t0 = time.perf_counter()
    try:
        res = train(load_config(str(TINY), over))
    except Exception as e:
        if missing_compiler(e):
            raise Skip(f"missing compiler: {error_line(e)}") from None
        raise
    seconds = time.perf_counter() - t0
    losses = dict(logged_losses(run))
    check(res.get("steps") == 3 and all(math.isfinite(v) for v in losses.values()),
          f"compiled run: steps {res.get('steps')}, losses {losses}")
    return {"steps": 3, "seconds_incl_compile": round(seconds, 2), "final_loss": losses[3]}, \
        f"3 compiled steps in {seconds:.0f} s (compile included), final loss {losses[3]:.3f}"


def missing_compiler(e: BaseException) -> bool:
    """True for the errors torch.compile raises when the toolchain is absent (no C++ compiler for inductor's
    CPU code, no triton for its GPU code), not for a failure of the model's own graph."""
    text = "".join(traceback.format_exception_only(type(e), e)).lower()
    return any(s in text for s in ("invalidcxxcompiler", "no working c++ compiler", "cannot find a working triton",
                                   "triton is not installed", "no module named 'triton'", "compiler not found",
                                   "command 'g++' not found", "gcc: not found", "g++: not found"))


def stage_throughput(ctx: Ctx) -> tuple[dict, str]:
    """fastcl.lab.benchmarks.step (`python -m fastcl.bench step`), MoCo-v2 steps: CIFAR ResNet-18 on gpu_tensor
    (the loader inside the timed step) with the loader's share of it, then ResNet-50 2x224 on synthetic data.
    Evidence JSON (step_*.json) lands in the output folder."""
    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu"
    cifar = bench_step(ctx, CIFAR_R18, "gpu_tensor", [f"data.path={ctx.cifar()}/train", *ctx.size.cifar_bench],
                       "step_cifar_r18_gpu_tensor")
    cifar["loader_ms_per_batch"] = loader_ms(ctx, [f"data.path={ctx.cifar()}/train", *ctx.size.cifar_bench],
                                             cifar["batches"])
    cifar["data_wait_pct"] = round(100 * cifar["loader_ms_per_batch"] / (1e3 * cifar["s_per_step"]), 1)
    r50 = bench_step(ctx, IMAGENET_R50, "synthetic", ctx.size.r50_bench, "step_r50_224_synthetic")
    numbers = {"device": name, "cifar_r18_gpu_tensor": cifar, "r50_224_synthetic": r50}
    return numbers, (f"{name}: CIFAR R18 {cifar['img_per_s']:.0f} img/s (data wait {cifar['data_wait_pct']:.0f} %), "
                     f"R50 2x224 {r50['img_per_s']:.0f} img/s")


def bench_step(ctx: Ctx, config: Path, backend: str, overrides: list[str], name: str) -> dict:
    from fastcl.lab.benchmarks import step

    timing = [f"--{k}={v}" for k, v in ctx.size.bench.items()]
    res = step.main(["--config", str(config), "--methods", "mocov2", "--backend", backend, *timing,
                     "--out", ctx.out, "--name", name, *precision_overrides(ctx), *overrides])["mocov2"]
    check(res["img_per_s"] > 0 and math.isfinite(res["img_per_s"]), f"{name}: img/s {res['img_per_s']}")
    return {"img_per_s": round(res["img_per_s"], 1), "s_per_step": res["median_s_per_step"],
            "batches": ctx.size.bench["steps"] * ctx.size.bench["repeats"]}


def loader_ms(ctx: Ctx, overrides: list[str], batches: int) -> float:
    """Milliseconds per batch of the gpu_tensor loader alone (device synchronised): the time the step waits
    for its data, since the loader's crops and colour ops run on the same device stream as the step."""
    from fastcl.config import load_config
    from fastcl.pipelines import build_loader

    cfg = load_config(str(CIFAR_R18), ["data.backend=gpu_tensor", *overrides])
    loader = build_loader(cfg, 0, 1, ctx.device)
    first_batches(loader, 1)  # warm-up (allocator, first transfer)
    sync(ctx.device)
    t0 = time.perf_counter()
    n = 0
    while n < batches:
        n += len(first_batches(loader, batches - n))
    sync(ctx.device)
    return round((time.perf_counter() - t0) / n * 1e3, 3)


def stage_dali(ctx: Ctx) -> tuple[dict, str]:
    """Two epochs of the DALI loader over the labelled folder: "mixed" (GPU JPEG decode) on CUDA, the CPU graph
    otherwise."""
    ok, detail = try_import("nvidia.dali")
    if not ok:
        raise Skip(f"not installed ({detail})")
    numbers = run_loader(ctx, "dali", ctx.cifar() + "/train")
    numbers["mode"] = "mixed" if ctx.cuda else "cpu"
    numbers["version"] = try_import("nvidia.dali")[1]
    return numbers, (f"DALI {numbers['version']} {numbers['mode']}: {numbers['batches']} batches, first epoch "
                     f"{numbers['first_epoch_s']:.1f} s, then {numbers['img_per_s']:.0f} img/s")


def stage_ffcv(ctx: Ctx) -> tuple[dict, str]:
    """The labelled folder written to a .beton (pipelines/convert.py), then two epochs of the ffcv loader."""
    ok, detail = try_import("ffcv")
    if not ok:
        raise Skip(f"not installed ({detail})")
    from fastcl.pipelines.convert import convert

    beton = os.path.join(ctx.work, "train.beton")
    convert(ctx.cifar() + "/train", beton, write_mode="jpg", workers=2, overwrite=True, progress=False)
    numbers = run_loader(ctx, "ffcv", beton)
    numbers["version"] = version("ffcv")
    return numbers, (f"ffcv {numbers['version']}: {numbers['batches']} batches, first epoch "
                     f"{numbers['first_epoch_s']:.1f} s (JIT compile), then {numbers['img_per_s']:.0f} img/s")


def run_loader(ctx: Ctx, backend: str, path: str) -> dict:
    """Two whole epochs of `backend` over the labelled folder (as training reads it: an epoch is never left
    half-read): the first builds the pipeline (ffcv's JIT compile, DALI's graph), the second is timed."""
    from fastcl.config import load_config
    from fastcl.pipelines import build_loader

    over = cifar_overrides(ctx.cifar(), backend, ctx.size.loader_batch, ctx.workers)
    loader = build_loader(load_config(None, over + [f"data.path={path}"]), 0, 1, ctx.device)
    epochs, seconds = [], []
    for epoch in range(2):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        epochs.append(list(loader))
        sync(ctx.device)
        seconds.append(time.perf_counter() - t0)
    n = len(train_paths(ctx))
    for b in epochs[0] + epochs[1]:
        check_batch(b, 32, n)
    check(len(epochs[0]) == len(epochs[1]) == len(loader) > 0,
          f"{backend}: {len(epochs[0])} + {len(epochs[1])} batches, expected {len(loader)} per epoch")
    images = sum(b.views[0].shape[0] for b in epochs[1])
    return {"batches": len(epochs[0]) + len(epochs[1]), "first_epoch_s": round(seconds[0], 2),
            "img_per_s": images / max(seconds[1], 1e-9), "device": str(epochs[0][0].views[0].device)}


PUBLISHED_DEMO = REPO / "docs" / "results" / "moco_demo_published_curve.json"


def full_cifar() -> str:
    """All of CIFAR-10 (50k train / 10k test JPEGs) from the first tarball found, extracted once."""
    from fastcl.pipelines.extract import extract_once

    found = [t for t in FULL_TARBALLS if os.path.isfile(t)]
    if not found:
        raise Skip(f"the full CIFAR-10 tarball is not here (looked for {', '.join(FULL_TARBALLS)})")
    return extract_once(found[0], str(REPO / "data" / "extracted" / "cifar10-jpeg"))


def stage_moco_demo(ctx: Ctx) -> tuple[dict, str]:
    """The MoCo CIFAR-10 demo exactly (configs/exp/cifar10_moco_demo.yaml) for the first epochs the budget
    allows, its kNN after every epoch put beside the notebook's published curve. Full size: the demo's network,
    batch and all of CIFAR-10 (a fidelity check: fastcl's data is the JPEG copy, so expect small differences).
    Toy size: a width-8 network on the toy folder, which exercises the config, the head-feature monitor and the
    comparison but whose numbers are not comparable with the published ones."""
    from fastcl.config import load_config
    from fastcl.train import train

    root = full_cifar() if ctx.size.demo_full_data else ctx.cifar()
    run = os.path.join(ctx.work, "moco_demo")
    shutil.rmtree(run, ignore_errors=True)
    base = [f"data.path={root}/train", f"data.eval_path={root}/test", "data.backend=gpu_tensor",
            *ctx.size.demo, *precision_overrides(ctx), f"trainer.run_dir={run}", "trainer.trackers=[]",
            "trainer.progress=false", "trainer.knn_every=1"]
    cfg = load_config(str(REPO / "configs" / "exp" / "cifar10_moco_demo.yaml"), base)
    from fastcl.pipelines.folder import scan_folder
    spe = len(scan_folder(cfg.data.path).paths) // cfg.optim.batch_size  # drop_last, as the demo
    t0 = time.perf_counter()
    res = train(load_config(str(REPO / "configs" / "exp" / "cifar10_moco_demo.yaml"),
                            base + [f"trainer.max_steps={ctx.size.demo_epochs * spe}"]))
    seconds = time.perf_counter() - t0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        curve = {r["epoch"]: r["knn_top1"] for r in map(json.loads, f) if "knn_top1" in r}
    with open(PUBLISHED_DEMO) as f:
        published = {int(e): v for e, v in json.load(f)["epochs"].items()}
    check(res.get("steps") == ctx.size.demo_epochs * spe and all(math.isfinite(v) for v in curve.values()),
          f"the demo run stopped at step {res.get('steps')} with kNN {curve}")
    rows = [(e, curve[e], published.get(e)) for e in sorted(curve) if e >= 1]
    side = ", ".join(f"{e}: {k:.1f}/{p:.1f}" if p is not None else f"{e}: {k:.1f}/-" for e, k, p in rows)
    numbers = {"epochs": [e for e, _, _ in rows], "fastcl_knn": [k for _, k, _ in rows],
               "published_knn": [p for _, _, p in rows], "knn_init": curve.get(0), "seconds": round(seconds, 1),
               "img_per_s": round(res.get("steps", 0) * cfg.optim.batch_size / max(seconds, 1e-9), 1),
               "comparable": bool(ctx.size.demo_full_data)}
    what = "" if ctx.size.demo_full_data else " (toy network and data: not comparable)"
    return numbers, f"kNN by epoch, fastcl/published{what}: {side}"


STAGES: dict[str, Callable[[Ctx], tuple[dict, str]]] = {
    "env": stage_env,
    "kernels": stage_kernels,
    "mining": stage_mining,
    "loader": stage_loader,
    "train": stage_train,
    "monitor": stage_monitor,
    "compile": stage_compile,
    "throughput": stage_throughput,
    "dali": stage_dali,
    "ffcv": stage_ffcv,
    "moco_demo": stage_moco_demo,
}


# ------------------------------------------------------------------------------------------------ runner

@contextlib.contextmanager
def time_budget(seconds: float, log):
    """SIGALRM raises StageTimeout in the stage after `seconds`; a stage stuck in C code past seconds +
    HANG_GRACE_S ends the process (faulthandler dumps every thread's stack into the stage's log first).
    Signals only work in the main thread: elsewhere the budget is not enforced."""
    main = threading.current_thread() is threading.main_thread()
    if not main or seconds <= 0:
        yield
        return

    def on_alarm(signum, frame):
        raise StageTimeout(f"stage exceeded its time budget of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + HANG_GRACE_S, exit=True, file=log)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, old)


def run_stage(name: str, fn: Callable, ctx: Ctx, budget: float) -> dict:
    """One stage, isolated: its output appended to gpucheck.log, its exception into status and reason."""
    t0 = time.perf_counter()
    numbers, status, reason = {}, "pass", ""
    with open(os.path.join(ctx.out, "gpucheck.log"), "a") as log:
        log.write(f"\n===== stage {name} (budget {budget:.0f} s) =====\n")
        log.flush()
        try:
            with time_budget(budget, log), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                numbers, reason = fn(ctx)
        except Skip as e:
            status, reason = "skipped", str(e)
        except (Exception, StageTimeout) as e:
            status, reason = "fail", error_line(e)
            traceback.print_exc(file=log)
            numbers = {"traceback_tail": traceback.format_exc().strip().splitlines()[-6:]}
    return {"status": status, "reason": reason, "seconds": round(time.perf_counter() - t0, 2), "numbers": numbers}


def write_report(report: dict) -> None:
    """report["json"], atomically (a reader never sees half a file; a killed run leaves the last complete one)."""
    path = report["json"]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(tmp, path)


def print_table(report: dict) -> None:
    rows = [(n, s["status"], f"{s['seconds']:.1f}", s["reason"]) for n, s in report["stages"].items()]
    w = [max(len(r[i]) for r in rows + [("stage", "status", "seconds", "")]) for i in range(3)]
    print(f"\nfastcl.gpucheck --size {report['size']} on {report['device']}  ({report['wall_s']:.1f} s)")
    print(f"{'stage':{w[0]}}  {'status':{w[1]}}  {'seconds':>{w[2]}}  reason / numbers")
    for n, st, sec, reason in rows:
        print(f"{n:{w[0]}}  {st:{w[1]}}  {sec:>{w[2]}}  {reason}")
    print(f"results: {report['json']}")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m fastcl.lab.gpucheck", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpucheck",
                    help="output folder: gpucheck.json, gpucheck.log, the throughput stage's step_*.json")
    ap.add_argument("--size", choices=list(SIZES), default="toy",
                    help="toy: CPU CI (tiny networks, about a minute on 2 cores); full: a lent H100/H200")
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), default=None, help="run only these (in order)")
    ap.add_argument("--timeout-s", type=float, default=0,
                    help="time budget of EACH stage in seconds (default: per stage and size, see SIZES)")
    ap.add_argument("--total-s", type=float, default=0,
                    help="time budget of all stages together; a stage is cut to what is left, and stages after it "
                         "fail as not run (default: 600 s toy, 540 s full, inside a 10-minute device command)")
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "gpucheck.log"), "w").close()
    with tempfile.TemporaryDirectory(prefix="fastcl_gpucheck.") as work:
        return run_all(a, Ctx(a.size, out, device, work))


def run_all(a, ctx: Ctx) -> int:
    """Every selected stage in order; the JSON is rewritten before and after each one."""
    if a.size == "toy" and not ctx.cuda:
        torch.set_num_threads(1)  # tiny ops on a shared 2-core machine: OpenMP barriers cost more than they gain
    stages = {n: fn for n, fn in STAGES.items() if a.stages is None or n in a.stages}
    report = new_report(a, ctx, list(stages))
    t0 = time.perf_counter()
    total = a.total_s or SIZES[a.size].total_s
    for name, fn in stages.items():
        left = total - (time.perf_counter() - t0)
        budget = min(a.timeout_s or SIZES[a.size].budgets.get(name, 120), left)
        if budget < 1:
            result = {"status": "fail", "seconds": 0.0, "numbers": {},
                      "reason": f"not run: the check's total budget of {total:.0f} s was spent"}
        else:
            report["stages"][name]["reason"] = f"did not finish (the process died or hung past its {budget:.0f} s)"
            write_report(report)
            result = run_stage(name, fn, ctx, budget)
        report["stages"][name] = result
        report["wall_s"] = round(time.perf_counter() - t0, 2)
        write_report(report)
        print(f"[gpucheck] {name}: {result['status']} ({result['seconds']:.1f} s) {result['reason']}", flush=True)
    report["failed"] = [n for n, s in report["stages"].items() if s["status"] == "fail"]
    write_report(report)
    print_table(report)
    return 1 if report["failed"] else 0


def new_report(a, ctx: Ctx, stages: list[str]) -> dict:
    """Every selected stage starts as failed and "not reached": a run killed from outside leaves that."""
    return {"size": a.size, "device": torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu",
            "command": "python -m fastcl.lab.gpucheck " + " ".join(a.argv),
            "json": os.path.join(ctx.out, "gpucheck.json"), "wall_s": 0.0,
            "stages": {n: {"status": "fail", "reason": "not reached (the check was killed or crashed before)",
                           "seconds": 0.0, "numbers": {}} for n in stages}}


if __name__ == "__main__":
    sys.exit(main())
