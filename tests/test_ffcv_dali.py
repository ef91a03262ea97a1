"""ffcv and dali backends on real CIFAR-10 JPEGs: ids and labels through the loaders, sharding over ranks,
epochs, resume, the missing-`index` error.

The data set (conftest.py `ffcv_dali_data`) is the CIFAR train subset (500 JPEGs, 10 classes) plus a class
`zz_coord` of copies of one coordinate-map PNG (R = 2x, G = 2y) that tests/test_parity.py uses to read crop
boxes back from the pixels. FFCV JIT-compiles every new Loader for 20-38 s, so the whole session shares ONE
ffcv loader (built through the `ffcv` registry entry, in that session fixture, which test_parity.py uses too);
other ranks and batch sizes reuse it via `with_shard`.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastcl.pipelines import build_loader
from fastcl.pipelines.batch import shard_indices
from fastcl.pipelines.folder import scan_folder

BATCH = 64  # = the fixture's batch (checked below)
SEED = 0


@pytest.fixture(scope="session")
def data(ffcv_dali_data) -> dict:
    """The session's shared data set and ffcv loader (conftest.ffcv_dali_data)."""
    assert ffcv_dali_data["batch"] == BATCH and ffcv_dali_data["seed"] == SEED
    return ffcv_dali_data


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
    assert ld.num_samples == len(scan) == 500 + data["n_coord"]
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

def _dali(data: dict, rank: int = 0, world: int = 1, drop_last: bool = False, batch: int = BATCH):
    return build_loader(data["make_cfg"]("dali", data["root"], batch, drop_last), rank, world, "cpu")


def test_dali_every_id_once_per_epoch_one_and_two_ranks(data):
    pytest.importorskip("nvidia.dali")
    scan = data["scan"]
    n, labels = len(scan), torch.tensor(scan.labels)
    ld = _dali(data)
    assert ld.num_samples == n
    orders = []
    for epoch in (0, 1):
        batches = run_epoch(ld, epoch)
        check_epoch(batches, ld, n, 0, 1, epoch, labels)  # also: the last partial batch has no padding copies
        orders.append(torch.cat([b.index for b in batches]))
    assert not torch.equal(orders[0], orders[1])
    ranks = [_dali(data, r, 2) for r in range(2)]
    ids = []
    for r, rl in enumerate(ranks):
        batches = run_epoch(rl, 2)
        check_epoch(batches, rl, n, r, 2, 2, labels)
        ids.append(torch.cat([b.index for b in batches]))
    assert torch.equal(torch.cat(ids).sort().values, torch.arange(n))


def test_dali_drop_last_equal_batches_and_resume(data):
    pytest.importorskip("nvidia.dali")
    n = len(data["scan"])
    ranks = [_dali(data, r, 2, drop_last=True) for r in range(2)]
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
    ld = build_loader(data["make_cfg"]("dali", data["root"]), 0, 1, "cuda")
    b = next(iter(ld))
    assert b.views[0].is_cuda and b.index.is_cuda and len(b.index) == BATCH
