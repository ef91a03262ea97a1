"""Shared pytest fixtures: small REAL image folders cut from the datasets in ../shared/data.

- `cifar_folder`: CIFAR-10 JPEGs, 50 train + 20 test per class (500 + 200 images, 32x32):
  `<root>/train/<class>/NNNN.jpg` and `<root>/test/<class>/NNNN.jpg`.
- `imagenette_folder`: Imagenette, the first 20 train images of the first 3 classes (real photos, 224x224
  JPEG): `<root>/train/<wnid>/*.JPEG`.
Both return the root (a str). They are extracted once into the git-ignored data/extracted/ and reused by later
sessions; a folder appears only complete (built in a temp dir, then renamed), so concurrent test runs are safe.
Tests that need them are skipped when the tarballs are absent (set FASTCL_SHARED_DATA to their folder).

Threads: tests run torch with ONE intra-op thread (override with FASTCL_TEST_THREADS). On a 2-core machine
that other processes also load, OpenMP's two threads wait on each other at every op: a 200k-element multiply
measured 15 ms with 2 threads against 0.02 ms with 1. Tests are not benchmarks; `fastcl.bench` sets its own.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXTRACTED = REPO / "data" / "extracted"
SHARED_DATA = Path(os.environ.get("FASTCL_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(int(os.environ.get("FASTCL_TEST_THREADS", "1")))


def _extract_subset(tarball: Path, dest: Path, keep, stop=None) -> str:
    """Stream `tarball`, writing member `top/<rest>` to `dest/<rest>` when keep(rest) is true; stop(rest) true
    ends the scan early (the tarballs are name-sorted). Reuses `dest` if it already exists."""
    if dest.is_dir():
        return str(dest)
    if not tarball.is_file():
        pytest.skip(f"dataset tarball not found: {tarball}")
    EXTRACTED.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=EXTRACTED))
    with tarfile.open(tarball, "r|gz") as tar:
        for m in tar:
            rest = m.name.split("/", 1)[1] if "/" in m.name else ""
            if not m.isfile():
                continue
            if stop is not None and stop(rest):
                break
            if keep(rest):
                out = tmp / rest
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())
    try:
        tmp.rename(dest)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


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
