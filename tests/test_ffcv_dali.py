"""ffcv and dali backends on real CIFAR-10 JPEGs: ids and labels through the loaders, sharding over ranks,
epochs, resume, the missing-`index` error.

The data set (`shared_data`) is the CIFAR train subset (500 JPEGs, 10 classes) plus a class `zz_coord` of
copies of one coordinate-map PNG (R = 2x, G = 2y) that tests/test_parity.py uses to read crop boxes back
from the pixels. FFCV JIT-compiles every new Loader for 20-38 s, so the whole session shares ONE ffcv
loader (built through the `ffcv` registry entry); other ranks and batch sizes reuse it via `with_shard`.
test_parity.py imports `shared_data` from here so that the two files share it too.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastcl.config import load_config
from fastcl.pipelines import build_loader
from fastcl.pipelines.batch import shard_indices
from fastcl.pipelines.folder import scan_folder

BATCH = 64
N_COORD = 256  # coordinate-map samples (symlinks to one PNG)
COORD_SIDE = 128
SEED = 0
# view 0: the full default recipe (MoCo-v2 colour ops); view 1: crop + flip only, so pixels keep coordinates
VIEW_OVERRIDES = ["data.aug.views.0.size=32", "data.aug.views.1.size=32", "data.aug.views.1.jitter_p=0",
                  "data.aug.views.1.gray_p=0", "data.aug.views.1.blur_p=0",
                  "data.aug.mean=[0.4914,0.4822,0.4465]", "data.aug.std=[0.247,0.2435,0.2616]"]

_SHARED: dict = {}


def coord_image(side: int = COORD_SIDE) -> np.ndarray:
    """HxWx3 uint8 with R = 2*x, G = 2*y, B = 0: a crop's box can be read back from its pixel values."""
    y, x = np.mgrid[0:side, 0:side]
    return np.stack([2 * x, 2 * y, np.zeros_like(x)], -1).astype(np.uint8)


def make_cfg(backend: str, path: str, batch: int = BATCH, drop_last: bool = False, workers: int = 2):
    return load_config(None, [f"data.backend={backend}", f"data.path={path}", f"optim.batch_size={batch}",
                              f"data.drop_last={drop_last}", f"data.workers={workers}", f"trainer.seed={SEED}",
                              *VIEW_OVERRIDES])


def shared_data(tmp_root: str, cifar_folder: str) -> dict:
    """Build once per process: the mixed folder, its .beton (raw pixels) and the one ffcv loader."""
    if _SHARED:
        return _SHARED
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
    _SHARED.update(root=root, scan=scan_folder(root))
    if _has("ffcv"):
        from fastcl.pipelines.convert import convert

        beton = os.path.join(tmp_root, "mixed.beton")
        convert(root, beton, write_mode="raw", workers=2, progress=False)
        _SHARED.update(beton=beton, ffcv=build_loader(make_cfg("ffcv", beton), 0, 1, "cpu"))
    return _SHARED


def _has(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


@pytest.fixture(scope="session")
def data(tmp_path_factory, cifar_folder) -> dict:
    return shared_data(str(tmp_path_factory.mktemp("ffcv_dali")), cifar_folder)


def run_epoch(loader, epoch: int) -> list:
    loader.set_epoch(epoch)
    return list(loader)


def check_epoch(batches: list, loader, n: int, rank: int, world: int, epoch: int, labels: torch.Tensor) -> None:
    """Batch k of this rank = the k-th slice of shard_indices (the torch backend's order); labels by id."""
    b = loader.sampler.batch_size
    want = shard_indices(n, b, rank, world, SEED, epoch, shuffle=True, drop_last=loader.sampler.drop_last)
    got = torch.cat([x.index for x in batches])
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert len(batches) == len(loader)
    for x in batches:
        assert torch.equal(x.label, labels[x.index])
        assert all(v.shape == (len(x.index), 3, 32, 32) and v.dtype == torch.float32 for v in x.views)


# ------------------------------------------------------------------------------------------------ ffcv

def test_ffcv_round_trip_ids_and_labels(data):
    pytest.importorskip("ffcv")
    from fastcl.pipelines.ffcv_loader import read_beton_fields

    scan, ld = data["scan"], data["ffcv"]
    index, labels = read_beton_fields(data["beton"])
    np.testing.assert_array_equal(index, np.arange(len(scan)))  # index = position in scan_folder order
    np.testing.assert_array_equal(labels, scan.labels)
    assert ld.num_samples == len(scan) == 500 + N_COORD
    batches = run_epoch(ld, 0)  # the first epoch JIT-compiles (20-38 s), once for the whole session
    check_epoch(batches, ld, len(scan), 0, 1, 0, torch.tensor(scan.labels))


def test_ffcv_every_id_once_per_epoch_one_and_two_ranks(data):
    pytest.importorskip("ffcv")
    scan, ld = data["scan"], data["ffcv"]
    n, labels = len(scan), torch.tensor(scan.labels)
    orders = []
    for epoch in (1, 2):
        batches = run_epoch(ld, epoch)
        check_epoch(batches, ld, n, 0, 1, epoch, labels)
        orders.append(torch.cat([b.index for b in batches]))
    assert not torch.equal(orders[0], orders[1])  # reshuffled per epoch
    # two simulated ranks: per-rank batch = global // world, same compiled ffcv pipelines
    ranks = [ld.with_shard(r, 2, BATCH // 2) for r in range(2)]
    ids = []
    for r, rl in enumerate(ranks):
        batches = run_epoch(rl, 3)
        check_epoch(batches, rl, n, r, 2, 3, labels)
        ids.append(torch.cat([b.index for b in batches]))
    assert torch.equal(torch.cat(ids).sort().values, torch.arange(n))  # exactly once across ranks


def test_ffcv_drop_last_and_resume(data):
    pytest.importorskip("ffcv")
    scan, ld = data["scan"], data["ffcv"]
    n = len(scan)
    r0 = ld.with_shard(0, 2, BATCH // 2)
    r0.sampler.drop_last = True
    assert len(r0) == n // BATCH
    r0.load_state_dict({"epoch": 4, "batches_done": 3})
    rest = torch.cat([b.index for b in r0])
    want = shard_indices(n, BATCH // 2, 0, 2, SEED, 4, drop_last=True)
    assert torch.equal(rest, want[3 * (BATCH // 2):])
    assert r0.state_dict() == {"epoch": 4, "batches_done": n // BATCH}


def test_ffcv_missing_index_field(tmp_path, cifar_folder):
    pytest.importorskip("ffcv")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from fastcl.pipelines.ffcv_loader import FFCVLoader

    path = str(tmp_path / "no_index.beton")
    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in scan_folder(os.path.join(cifar_folder, "test")).paths[:4]]
    DatasetWriter(path, {"image": RGBImageField(write_mode="raw"), "label": IntField()}, num_workers=1) \
        .from_indexed_dataset([(im, 0) for im in imgs])
    with pytest.raises(ValueError, match=r"no `index` field") as e:
        FFCVLoader(path, [{}], (0.5,) * 3, (0.5,) * 3, 4)
    assert path in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.beton"):
        FFCVLoader(str(tmp_path / "missing.beton"), [{}], (0.5,) * 3, (0.5,) * 3, 4)


# ------------------------------------------------------------------------------------------------ dali

def _dali(root: str, rank: int = 0, world: int = 1, drop_last: bool = False, batch: int = BATCH):
    return build_loader(make_cfg("dali", root, batch, drop_last), rank, world, "cpu")


def test_dali_every_id_once_per_epoch_one_and_two_ranks(data):
    pytest.importorskip("nvidia.dali")
    scan = data["scan"]
    n, labels = len(scan), torch.tensor(scan.labels)
    ld = _dali(data["root"])
    assert ld.num_samples == n
    orders = []
    for epoch in (0, 1):
        batches = run_epoch(ld, epoch)
        check_epoch(batches, ld, n, 0, 1, epoch, labels)  # also: the last partial batch has no padding copies
        orders.append(torch.cat([b.index for b in batches]))
    assert not torch.equal(orders[0], orders[1])
    ranks = [_dali(data["root"], r, 2) for r in range(2)]
    ids = []
    for r, rl in enumerate(ranks):
        batches = run_epoch(rl, 2)
        check_epoch(batches, rl, n, r, 2, 2, labels)
        ids.append(torch.cat([b.index for b in batches]))
    assert torch.equal(torch.cat(ids).sort().values, torch.arange(n))


def test_dali_drop_last_equal_batches_and_resume(data):
    pytest.importorskip("nvidia.dali")
    n = len(data["scan"])
    ranks = [_dali(data["root"], r, 2, drop_last=True) for r in range(2)]
    per_rank = [torch.cat([b.index for b in run_epoch(rl, 5)]) for rl in ranks]
    assert [len(p) for p in per_rank] == [n // BATCH * (BATCH // 2)] * 2  # same batch count on every rank
    ids = torch.cat(per_rank)
    assert len(ids.unique()) == len(ids)
    r1 = ranks[1]
    r1.load_state_dict({"epoch": 5, "batches_done": 4})
    rest = torch.cat([b.index for b in r1])
    assert torch.equal(rest, per_rank[1][4 * (BATCH // 2):])


@pytest.mark.gpu
def test_dali_gpu_pipeline(data):
    pytest.importorskip("nvidia.dali")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ld = build_loader(make_cfg("dali", data["root"]), 0, 1, "cuda")
    b = next(iter(ld))
    assert b.views[0].is_cuda and b.index.is_cuda and len(b.index) == BATCH
