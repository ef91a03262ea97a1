"""ffcv and dali backends on real CIFAR-10 JPEGs: ids and labels through the loaders, sharding over ranks,
epochs, resume, the missing-`index` error; for dali also one graph for every epoch, the same pixels after a
resume, and the crop boxes it cuts.

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


def test_dali_builds_its_graph_once_and_resumes_with_the_same_pixels(data, monkeypatch):
    """Three epochs, a pass stopped early and a resume all run through ONE graph (built lazily on the first
    epoch); a loader resumed mid-epoch, on that graph or on a fresh loader's, yields the same ids AND the same
    pixels for the remaining batches as the uninterrupted pass (every random parameter is drawn per batch from
    (seed, epoch, rank, batch))."""
    pytest.importorskip("nvidia.dali")
    from fastcl.pipelines import dali_loader

    builds = []
    real = dali_loader.build_pipeline
    monkeypatch.setattr(dali_loader, "build_pipeline", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    ld = _dali(data)
    assert builds == []  # nothing is built before the first epoch
    full = {e: [(b.index, b.views) for b in run_epoch(ld, e)] for e in (6, 7, 8)}
    assert len(builds) == 1
    assert not torch.equal(full[6][0][1][0], full[7][0][1][0])
    ld.set_epoch(9)  # a pass the consumer leaves after 2 batches: DALI's queued batches are drained
    for k, _ in enumerate(ld):
        if k == 1:
            break
    ld.load_state_dict({"epoch": 7, "batches_done": 5})
    again = list(ld)
    assert len(builds) == 1
    fresh = _dali(data)
    fresh.load_state_dict({"epoch": 7, "batches_done": 5})
    resumed = list(fresh)
    assert len(builds) == 2  # the fresh loader's own graph
    for loader, got in ((ld, again), (fresh, resumed)):
        assert len(got) == len(full[7]) - 5 and loader.state_dict() == {"epoch": 7, "batches_done": len(full[7])}
        for b, (ids, views) in zip(got, full[7][5:]):
            assert torch.equal(b.index, ids)
            assert all(torch.equal(x, y) for x, y in zip(b.views, views))


def test_dali_cuts_the_drawn_crop_boxes(data):
    """The graph cuts exactly the RandomResizedCrop boxes that `view_params` drew for the batch
    (`augment.rrc_params`, torchvision's semantics) and flips exactly the drawn samples: read back from the
    pixels of the coordinate-map samples (R = 2x, G = 2y) in view 1 (crop + flip only)."""
    pytest.importorskip("nvidia.dali")
    from fastcl.rand import seed_for
    from fastcl.pipelines.dali_loader import DALI_STREAM, view_params

    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)  # conftest.VIEW_OVERRIDES
    std = torch.tensor([0.247, 0.2435, 0.2616]).view(1, 3, 1, 1)
    coord = data["scan"].classes.index("zz_coord")
    ld = _dali(data)
    ld.set_epoch(3)
    err, n = [], 0
    for k, b in enumerate(ld):
        g = torch.Generator().manual_seed(seed_for(SEED, 3, 0, k, DALI_STREAM))
        hw = torch.tensor([[32, 32] if lab != coord else [data["coord_side"]] * 2 for lab in b.label.tolist()])
        view_params(hw, ld.views[0], g)  # view 0's draws come first
        p = view_params(hw, ld.views[1], g)
        m = (b.label == coord).numpy()
        if not m.any():
            continue
        px = (b.views[1][torch.from_numpy(m)] * std + mean) * 255.0
        R, G = px[:, 0], px[:, 1]
        S = px.shape[-1]
        # output pixel j samples x0 + (j + 0.5) w / S, where the map holds 2 * (x - 0.5) (pixel centres)
        w = (R.amax((1, 2)) - R.amin((1, 2))) / 2 * S / (S - 1)
        h = (G.amax((1, 2)) - G.amin((1, 2))) / 2 * S / (S - 1)
        y0, x0 = G.amin((1, 2)) / 2 + 0.5 - 0.5 * h / S, R.amin((1, 2)) / 2 + 0.5 - 0.5 * w / S
        start, end = torch.from_numpy(p["roi_start"][m]), torch.from_numpy(p["roi_end"][m])
        err.append(torch.stack([y0, x0, h, w], 1) - torch.cat([start, end - start], 1))
        flipped = R[:, :, 0].mean(1) > R[:, :, -1].mean(1)
        assert torch.equal(flipped, torch.from_numpy(p["mirror"][m]).bool())
        n += int(m.sum())
    assert n == data["n_coord"]
    assert torch.cat(err).abs().max() < 1.0  # pixel rounding and antialiasing at the image edge (measured <= 0.7)


@pytest.mark.gpu
def test_dali_gpu_pipeline(data):
    pytest.importorskip("nvidia.dali")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ld = build_loader(data["make_cfg"]("dali", data["root"]), 0, 1, "cuda")
    b = next(iter(ld))
    assert b.views[0].is_cuda and b.index.is_cuda and len(b.index) == BATCH
