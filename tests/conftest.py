"""Shared pytest fixtures: small REAL image folders cut from the datasets in ../shared/data.

- `cifar_folder`: CIFAR-10 JPEGs, 50 train + 20 test per class (500 + 200 images, 32x32):
  `<root>/train/<class>/NNNN.jpg` and `<root>/test/<class>/NNNN.jpg`.
- `imagenette_folder`: Imagenette, the first 20 train images of the first 3 classes (real photos, 224x224
  JPEG): `<root>/train/<wnid>/*.JPEG`.
Both return the root (a str). They are extracted once into the git-ignored data/extracted/ and reused by later
sessions; a folder appears only complete (built in a temp dir, then renamed), so concurrent test runs are safe.
Tests that need them FAIL when the tarballs are absent, naming the path (set FASTCL_SHARED_DATA to their folder):
a missing data folder must not turn into a green run that skipped the real-image tests.
- `ffcv_dali_data` (session): the mixed folder (CIFAR train subset + a `zz_coord` class of coordinate-map
  PNGs), its .beton and the session's ONE ffcv loader (data.ffcv_decode=once, the default), shared by
  tests/test_ffcv_dali.py and tests/test_parity.py (FFCV JIT-compiles every new Loader: ~5 s for the decode-once
  decoder, 20-38 s for the stock per-view pipelines), plus `ffcv_per_view()`, that path's loader built on demand. The dict also carries the constants
  and `make_cfg` those tests build their loaders with.

Threads: tests run torch with ONE intra-op thread (override with FASTCL_TEST_THREADS). On a 2-core machine
that other processes also load, OpenMP's two threads wait on each other at every op: a 200k-element multiply
measured 15 ms with 2 threads against 0.02 ms with 1. Tests are not benchmarks; `fastcl.bench` sets its own.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXTRACTED = REPO / "data" / "extracted"
SHARED_DATA = Path(os.environ.get("FASTCL_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(int(os.environ.get("FASTCL_TEST_THREADS", "1")))


def _extract_subset(tarball: Path, dest: Path, keep, stop=None) -> str:
    """fastcl.pipelines.extract.extract_once of the members `top/<rest>` with keep(rest) true (stop(rest) true ends
    the scan: the tarballs are name-sorted); a missing tarball fails the test, naming where to put it."""
    from fastcl.pipelines.extract import extract_once

    if not tarball.is_file():
        pytest.fail(f"dataset tarball not found: {tarball} (the real-image tests need ../shared/data beside the "
                    f"repository, or FASTCL_SHARED_DATA=<folder with cifar10-jpeg/ and imagenette2-224/>)")
    return extract_once(str(tarball), str(dest), keep=keep, stop=stop)


@pytest.fixture(scope="session")
def cifar_folder() -> str:
    """CIFAR-10 subset root with train/ (50 per class) and test/ (20 per class)."""
    per_split = {"train": 50, "test": 20}

    def keep(rest: str) -> bool:  # rest = "train/cat/0042.jpg"
        parts = rest.split("/")
        stem = parts[-1].split(".")[0]
        return len(parts) == 3 and stem.isdigit() and int(stem) < per_split.get(parts[0], 0)

    return _extract_subset(SHARED_DATA / "cifar10-jpeg" / "cifar10-jpeg.tar.gz",
                           EXTRACTED / "cifar_test_subset", keep)


@pytest.fixture(scope="session")
def imagenette_folder() -> str:
    """Imagenette subset root with train/<wnid>/ for 3 classes, 20 images each."""
    classes, per_class, counts = 3, 20, {}

    def keep(rest: str) -> bool:  # rest = "train/n01440764/ILSVRC2012_val_00000293.JPEG"
        split, wnid = rest.split("/")[:2]
        if split != "train" or counts.get(wnid, 0) >= per_class:
            return False
        counts[wnid] = counts.get(wnid, 0) + 1
        return True

    def stop(rest: str) -> bool:  # train/ comes first and is class-sorted: stop at the 4th class
        return not rest.startswith("train/") or (rest.split("/")[1] not in counts and len(counts) >= classes)

    return _extract_subset(SHARED_DATA / "imagenette2-224" / "imagenette2-224.tar.gz",
                           EXTRACTED / "imagenette_test_subset", keep, stop)


# ------------------------------------------------------------------ SePP neighbour table for the tiny config

@pytest.fixture(scope="session")
def sepp_table(tmp_path_factory) -> tuple[str, str]:
    """(table, empty_table): neighbour tables for configs/test/tiny.yaml's 64 synthetic images, mined from their
    pixels (k=3, no threshold), and one with no partners at all."""
    import torch.nn.functional as F

    from fastcl.config import load_config
    from fastcl.mining.miner import NeighbourMiner
    from fastcl.pipelines import build_loader

    cfg = load_config(str(REPO / "configs" / "test" / "tiny.yaml"))
    loader = build_loader(cfg, 0, 1, "cpu")
    emb = F.normalize(loader.images(torch.arange(cfg.data.num_samples), 16).flatten(1), dim=1)
    miner = NeighbourMiner(cfg.data.num_samples, 3, 0.0)
    miner.mine(emb)
    folder = tmp_path_factory.mktemp("sepp")
    miner.save(str(folder / "table.npz"))
    NeighbourMiner(cfg.data.num_samples, 3, 0.0).save(str(folder / "empty.npz"))
    return str(folder / "table.npz"), str(folder / "empty.npz")


# ------------------------------------------------------------------ ffcv / dali: one shared data set + ffcv loader

FFCV_DALI_BATCH = 64
N_COORD = 256  # coordinate-map samples (symlinks to one PNG)
COORD_SIDE = 128
FFCV_DALI_SEED = 0
# view 0: the full default recipe (MoCo-v2 colour ops); view 1: crop + flip only, so pixels keep coordinates
VIEW_OVERRIDES = ["data.aug.views.0.size=32", "data.aug.views.1.size=32", "data.aug.views.1.jitter_p=0",
                  "data.aug.views.1.gray_p=0", "data.aug.views.1.blur_p=0",
                  "data.aug.mean=[0.4914,0.4822,0.4465]", "data.aug.std=[0.247,0.2435,0.2616]"]


def coord_image(side: int = COORD_SIDE) -> np.ndarray:
    """HxWx3 uint8 with R = 2*x, G = 2*y, B = 0: a crop's box can be read back from its pixel values."""
    y, x = np.mgrid[0:side, 0:side]
    return np.stack([2 * x, 2 * y, np.zeros_like(x)], -1).astype(np.uint8)


def make_cfg(backend: str, path: str, batch: int = FFCV_DALI_BATCH, drop_last: bool = False, workers: int = 2):
    from fastcl.config import load_config

    return load_config(None, [f"data.backend={backend}", f"data.path={path}", f"optim.batch_size={batch}",
                              f"data.drop_last={drop_last}", f"data.workers={workers}",
                              f"trainer.seed={FFCV_DALI_SEED}", *VIEW_OVERRIDES])


def _has(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


@pytest.fixture(scope="session")
def ffcv_dali_data(tmp_path_factory, cifar_folder) -> dict:
    """Built once per session: the mixed folder (`root`, its `scan`), and when ffcv is installed its raw-pixel
    `.beton` and the ffcv loader (`ffcv`, built through the `ffcv` registry entry; other ranks and batch sizes
    reuse its compiled pipeline via `with_shard`). Also `batch`, `seed`, `n_coord`, `coord_side`, `make_cfg`."""
    from PIL import Image

    from fastcl.pipelines import build_loader
    from fastcl.pipelines.folder import scan_folder

    tmp_root = str(tmp_path_factory.mktemp("ffcv_dali"))
    root = os.path.join(tmp_root, "mixed")
    src = os.path.join(cifar_folder, "train")
    for c in sorted(os.listdir(src)):
        os.makedirs(os.path.join(root, c))
        for f in sorted(os.listdir(os.path.join(src, c))):
            os.symlink(os.path.join(src, c, f), os.path.join(root, c, f))
    os.makedirs(os.path.join(root, "zz_coord"))
    png = os.path.join(tmp_root, "coord.png")
    Image.fromarray(coord_image()).save(png)
    for k in range(N_COORD):
        os.symlink(png, os.path.join(root, "zz_coord", f"{k:04d}.png"))
    out = dict(root=root, scan=scan_folder(root), batch=FFCV_DALI_BATCH, seed=FFCV_DALI_SEED, n_coord=N_COORD,
               coord_side=COORD_SIDE, make_cfg=make_cfg)
    if _has("ffcv"):
        from fastcl.pipelines.convert import convert

        beton = os.path.join(tmp_root, "mixed.beton")
        convert(root, beton, write_mode="raw", workers=2, progress=False)
        out.update(beton=beton, ffcv=build_loader(make_cfg("ffcv", beton), 0, 1, "cpu"))
        per_view = []

        def ffcv_per_view():
            """The stock one-pipeline-per-view path (data.ffcv_decode=per_view), built on first use (its JIT
            compile takes ~20 s)."""
            if not per_view:
                cfg = make_cfg("ffcv", beton)
                cfg.data.ffcv_decode = "per_view"
                per_view.append(build_loader(cfg, 0, 1, "cpu"))
            return per_view[0]

        out["ffcv_per_view"] = ffcv_per_view
    return out
