"""Loader backends synthetic / torch / gpu_tensor on real CIFAR JPEGs: sharding, epochs, views, resume;
plus scan_folder and the eval data helpers."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from fastcl.config import load_config
from fastcl.pipelines import build_loader
from fastcl.pipelines.eval_data import eval_batches
from fastcl.pipelines.folder import scan_folder
from fastcl.pipelines.torch_loader import FolderViews

BACKENDS = ["synthetic", "torch", "gpu_tensor"]
N_SYNTH = 300


def make_cfg(backend: str, path: str = "", batch: int = 64, drop_last: bool = False, workers: int = 0, *extra):
    return load_config(None, [f"data.backend={backend}", f"data.path={path}", f"optim.batch_size={batch}",
                              f"data.drop_last={drop_last}", f"data.workers={workers}",
                              f"data.num_samples={N_SYNTH}", *extra])


@pytest.fixture(scope="module")
def train_dir(cifar_folder) -> str:
    return os.path.join(cifar_folder, "train")


_CACHE: dict = {}


def loader(backend: str, path: str, rank: int = 0, world: int = 1, drop_last: bool = False, batch: int = 64):
    """Loaders are cached per configuration (gpu_tensor decodes its folder on construction)."""
    key = (backend, path, rank, world, drop_last, batch)
    if key not in _CACHE:
        _CACHE[key] = build_loader(make_cfg(backend, path, batch, drop_last), rank, world, "cpu")
    return _CACHE[key]


def epoch_ids(ld, epoch: int) -> list[torch.Tensor]:
    ld.set_epoch(epoch)
    return [b.index for b in ld]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2])
def test_every_id_once_per_epoch(backend, world, train_dir):
    n = N_SYNTH if backend == "synthetic" else 500
    ranks = [loader(backend, train_dir, r, world) for r in range(world)]
    batches = [epoch_ids(ld, 3) for ld in ranks]
    assert all(ld.num_samples == n for ld in ranks)
    assert [len(b) for b in batches] == [len(ld) for ld in ranks]
    ids = torch.cat([torch.cat(b) for b in batches])
    assert torch.equal(ids.sort().values, torch.arange(n))  # each sample exactly once across ranks
    # rank r's k-th batch is the r-th block of global batch k: per-rank batch = global // world
    assert all(len(b[0]) == 64 // world for b in batches)
    # drop_last: no duplicates, only full global batches, same number of batches on every rank
    dl = [torch.cat(epoch_ids(loader(backend, train_dir, r, world, drop_last=True), 3)) for r in range(world)]
    ids = torch.cat(dl)
    assert len(ids) == n // 64 * 64 and len(ids.unique()) == len(ids) and len({len(d) for d in dl}) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_orders(backend, train_dir):
    ld = loader(backend, train_dir, 0, 2)
    e0, e1 = torch.cat(epoch_ids(ld, 0)), torch.cat(epoch_ids(ld, 1))
    assert not torch.equal(e0, e1)  # a new permutation each epoch
    assert torch.equal(torch.cat(epoch_ids(ld, 0)), e0)  # same seed + epoch -> same order
    other = build_loader(make_cfg(backend, train_dir), 0, 2, "cpu")  # another process of the same run
    assert torch.equal(torch.cat(epoch_ids(other, 0)), e0)
    reseeded = build_loader(make_cfg(backend, train_dir, 64, False, 0, "trainer.seed=1"), 0, 2, "cpu")
    assert not torch.equal(torch.cat(epoch_ids(reseeded, 0)), e0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_contents(backend, train_dir):
    ld = loader(backend, train_dir)
    ld.set_epoch(0)
    b = next(iter(ld))
    assert len(b.views) == 2
    for v in b.views:
        assert v.shape == (64, 3, 32, 32) and v.dtype == torch.float32 and v.device.type == "cpu"
        assert abs(v.mean().item()) < 1.0 and 0.3 < v.std().item() < 2.0  # normalized
    assert not torch.allclose(b.views[0], b.views[1])  # two different augmentations
    assert (b.views[0] - b.views[1]).flatten(1).abs().amax(1).min() > 0  # ... of every sample
    assert b.index.dtype == torch.int64 and b.label.dtype == torch.int64
    assert torch.equal(b.label, ld.labels[b.index])
    # same epoch, same batch: reproducible pixels
    assert torch.equal(next(iter(ld)).views[0], b.views[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch(backend, train_dir, monkeypatch):
    ref = build_loader(make_cfg(backend, train_dir), 0, 1, "cpu")
    ref.set_epoch(2)
    full = list(ref)
    first = build_loader(make_cfg(backend, train_dir), 0, 1, "cpu")
    first.set_epoch(2)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    assert state == {"epoch": 2, "batches_done": 2}
    resumed = build_loader(make_cfg(backend, train_dir), 0, 1, "cpu")
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer re-announces the epoch it resumes: the skip must survive
    calls = []
    if backend == "torch":  # skipped batches are never decoded
        orig = FolderViews.__getitem__
        monkeypatch.setattr(FolderViews, "__getitem__", lambda self, k: calls.append(k) or orig(self, k))
    rest = list(resumed)
    assert len(rest) == len(full) - 2 and resumed.state_dict()["batches_done"] == len(full)
    for a, b in zip(rest, full[2:]):
        assert torch.equal(a.index, b.index) and all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    if backend == "torch":
        assert len(calls) == sum(len(b.index) for b in rest)
    resumed.set_epoch(3)  # a new epoch starts from its beginning
    assert resumed.state_dict() == {"epoch": 3, "batches_done": 0} and len(list(resumed)) == len(full)


def test_torch_loader_same_batches_with_workers(train_dir):
    """Per-sample seeds make the batches independent of the number of worker processes."""
    serial = loader("torch", train_dir)
    parallel = build_loader(make_cfg("torch", train_dir, 64, False, 2), 0, 1, "cpu")
    for epoch in (0, 1):  # persistent workers must see the new epoch
        serial.set_epoch(epoch)
        parallel.set_epoch(epoch)
        a, b = next(iter(serial)), next(iter(parallel))
        assert torch.equal(a.index, b.index) and torch.equal(a.views[0], b.views[0])
        assert torch.equal(a.views[1], b.views[1])


def test_imagenette_mixed_sizes(imagenette_folder):
    """Real 224x224 photos cropped to 64 px views: gpu_tensor keeps the native 224 px (all images share it)."""
    path = os.path.join(imagenette_folder, "train")
    sizes = ["data.aug.views.0.size=64", "data.aug.views.1.size=64"]
    gt = build_loader(make_cfg("gpu_tensor", path, 16, True, 0, *sizes), 0, 1, "cpu")
    assert gt.images.shape == (60, 3, 224, 224) and gt.images.dtype == torch.uint8
    tl = build_loader(make_cfg("torch", path, 16, True, 0, *sizes), 0, 1, "cpu")
    for ld in (gt, tl):
        b = next(iter(ld))
        assert [v.shape for v in b.views] == [(16, 3, 64, 64)] * 2 and len(ld) == 3
        assert set(ld.labels.tolist()) == {0, 1, 2}


def test_scan_folder_order_and_errors(train_dir, tmp_path):
    idx = scan_folder(train_dir)
    assert len(idx) == 500 and idx.classes == sorted(idx.classes) and len(idx.classes) == 10
    assert idx.labels == sorted(idx.labels) and idx.paths[0].endswith(os.path.join("airplane", "0000.jpg"))
    assert idx.paths[:50] == sorted(idx.paths[:50])
    assert scan_folder(train_dir, max_samples=7).paths == idx.paths[:7]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_folder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        scan_folder(str(tmp_path / "empty"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="notes"):
        scan_folder(str(tmp_path / "notes"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("b.PNG", "a.jpeg"):
        Image.new("RGB", (8, 8)).save(flat / name)
    f = scan_folder(str(flat))
    assert [os.path.basename(p) for p in f.paths] == ["a.jpeg", "b.PNG"] and f.labels == [-1, -1] and f.classes == []


@pytest.fixture
def odd_modes_folder(tmp_path) -> str:
    """Class folders holding a grayscale JPEG, a CMYK JPEG and an RGBA PNG of different sizes."""
    for cls, name, mode, size in [("a", "gray.jpg", "L", (40, 30)), ("b", "cmyk.jpg", "CMYK", (32, 32)),
                                  ("b", "rgba.png", "RGBA", (36, 48))]:
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.new(mode, size, color=(90,) * len(mode)).save(tmp_path / cls / name)
    return str(tmp_path)


@pytest.mark.parametrize("backend", ["torch", "gpu_tensor"])
def test_non_rgb_images_become_three_channels(backend, odd_modes_folder):
    ld = build_loader(make_cfg(backend, odd_modes_folder, 3), 0, 1, "cpu")
    if backend == "gpu_tensor":  # mixed sizes: stored as center squares at the largest view size
        assert ld.images.shape == (3, 3, 32, 32)
    b = next(iter(ld))
    assert [v.shape for v in b.views] == [(3, 3, 32, 32)] * 2
    assert sorted(b.label.tolist()) == [0, 1, 1]
    x, labels, _ = next(eval_batches(odd_modes_folder, make_cfg("torch", odd_modes_folder).data.aug, 8))
    assert x.shape == (3, 3, 32, 32) and labels.tolist() == [0, 1, 1]


def test_eval_batches_whole_and_sharded(cifar_folder):
    aug = make_cfg("torch", cifar_folder).data.aug
    test_dir = os.path.join(cifar_folder, "test")
    x, labels, ids = next(eval_batches(test_dir, aug, 1 << 30))  # one batch: the whole split
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(ids, torch.arange(200)) and torch.equal(labels.bincount(), torch.full((10,), 20))
    assert abs(x.mean().item()) < 0.5 and 0.5 < x.std().item() < 1.5
    parts = [list(eval_batches(test_dir, aug, 64, rank=r, world=2)) for r in range(2)]
    assert [len(p) for p in parts] == [2, 2] and len(parts[0][0][0]) == 64
    got_ids = torch.cat([b[2] for p in parts for b in p])
    assert torch.equal(got_ids, torch.arange(200))  # contiguous shards, in order
    got_x = torch.cat([b[0] for p in parts for b in p])
    assert torch.allclose(got_x, x) and torch.equal(torch.cat([b[1] for p in parts for b in p]), labels)
