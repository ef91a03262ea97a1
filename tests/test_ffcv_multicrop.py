"""ffcv decode-once path (`data.ffcv_decode=once`, pipelines/ffcv_multicrop.py) on real JPEGs.

Every view of a sample must be a crop of ONE decode of that sample's stored JPEG: the test re-reads the JPEG bytes
from the .beton, decodes them once itself (libjpeg-turbo through ffcv's `imdecode`, at the DCT scale the loader
reports), cuts each reported box with OpenCV's INTER_AREA resize (not ffcv's code) and flips, and requires the
loader's pixels to be EQUAL. Views run crop + flip only with mean 0 / std 1, so pixels come back exactly as
255 * value. Multi-crop configs (2 x 32 + 2 x 16 on CIFAR-10 JPEGs, 2 x 64 + 4 x 32 with DCT-scaled decodes on
Imagenette photos). Also: the hashed crop draws equal `augment.seed_for`'s streams and follow the AugSpec's
distribution (20k draws against `rrc_params`); crops are reproducible and a mid-epoch resume continues with the
same ids AND pixels; a folder of 1-channel PNGs converted with pipelines/convert.py trains through ffcv.
The crop-distribution parity with torch and dali on the coordinate map is tests/test_parity.py (its shared ffcv
loader uses the default, decode=once; `ffcv_per_view` is the stock path there).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

from fastcl.pipelines.augment import rrc_params  # noqa: E402
from fastcl.pipelines.augspec import ViewSpec  # noqa: E402
from fastcl.pipelines.ffcv_multicrop import FFCV_STREAM, rrc_hashed, view_boxes, view_key  # noqa: E402
from fastcl.rand import seed_for  # noqa: E402

CROP_FLIP = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
CIFAR_VIEWS = [ViewSpec(size=32, **CROP_FLIP), ViewSpec(size=32, **CROP_FLIP),
               ViewSpec(size=16, scale=(0.05, 0.4), **CROP_FLIP), ViewSpec(size=16, scale=(0.05, 0.4), **CROP_FLIP)]
NETTE_VIEWS = [ViewSpec(size=64, **CROP_FLIP)] * 2 + [ViewSpec(size=32, scale=(0.05, 0.14), **CROP_FLIP)] * 4
BATCH = 50


def _convert(src: str, out: str) -> str:
    from fastcl.pipelines.convert import convert

    convert(src, out, write_mode="jpg", workers=1, progress=False)
    return out


def _loader(beton: str, views, dct_scale: bool = False, batch: int = BATCH):
    from fastcl.pipelines.ffcv_loader import FFCVLoader

    # mean 0 / std 1: the normalized output is pixel / 255, exactly invertible
    return FFCVLoader(beton, views, (0.0,) * 3, (1.0,) * 3, batch, workers=2, drop_last=False, decode="once",
                      dct_scale=dct_scale)


@pytest.fixture(scope="module")
def cifar_mc(tmp_path_factory, cifar_folder):
    beton = _convert(os.path.join(cifar_folder, "train"), str(tmp_path_factory.mktemp("mc") / "cifar.beton"))
    return beton, _loader(beton, CIFAR_VIEWS)


@pytest.fixture(scope="module")
def nette_mc(tmp_path_factory, imagenette_folder):
    beton = _convert(os.path.join(imagenette_folder, "train"), str(tmp_path_factory.mktemp("mc") / "nette.beton"))
    return beton, _loader(beton, NETTE_VIEWS, dct_scale=True, batch=20)


def epoch_batches(loader, epoch: int) -> list[tuple]:
    """[(ids [B], uint8 views [[B,3,S,S] per view], meta int32 [B, 2 + 6V])] of one epoch."""
    loader.set_epoch(epoch)
    out = []
    for b in loader:
        px = [torch.round(v * 255).to(torch.uint8) for v in b.views]
        out.append((b.index.clone(), px, loader.last_meta.clone()))
    return out


def stored_jpeg(beton: str, row: int) -> tuple[np.ndarray, int, int]:
    """(JPEG bytes, height, width) of the `image` field of one .beton row, read with ffcv's Reader tables."""
    from ffcv.reader import Reader

    r = Reader(beton)
    f = f"f{list(r.handlers).index('image')}"
    meta = r.metadata[f][row]
    ptr = int(meta["data_ptr"])
    size = int(r.alloc_table["size"][r.alloc_table["ptr"] == ptr][0])
    with open(beton, "rb") as fh:
        fh.seek(ptr)
        return np.frombuffer(fh.read(size), dtype=np.uint8), int(meta["height"]), int(meta["width"])


def reference_decode(data: np.ndarray, H: int, W: int, num: int) -> np.ndarray:
    """ONE libjpeg-turbo decode at scale num/8 -> [ceil(H num/8), ceil(W num/8), 3] uint8 RGB."""
    from ffcv.libffcv import imdecode

    out = np.zeros(((H * num + 7) // 8, (W * num + 7) // 8, 3), dtype=np.uint8)
    assert imdecode(data, out, H, W, H, W, 0, 0, num, 8, False, False) == 0
    return out


def reference_crop(img: np.ndarray, box, size: int) -> np.ndarray:
    """box (y0, x0, h, w, flipped, num) in full-resolution pixels -> [S,S,3]: the box on the num/8 image
    (edges rounded), OpenCV INTER_AREA resize, mirrored when flipped."""
    import cv2

    y0, x0, h, w, flipped, num = (int(x) for x in box)
    Hs, Ws = img.shape[:2]
    ya, xa = (y0 * num + 4) // 8, (x0 * num + 4) // 8
    yb = max(min(((y0 + h) * num + 4) // 8, Hs), ya + 1)
    xb = max(min(((x0 + w) * num + 4) // 8, Ws), xa + 1)
    crop = cv2.resize(np.ascontiguousarray(img[ya:yb, xa:xb]), (size, size), interpolation=cv2.INTER_AREA)
    return crop[:, ::-1] if flipped else crop


def check_views_are_crops_of_one_decode(beton: str, batches: list, views, rows_of=None) -> dict:
    """Every view of every sample equals the reference crop of ONE reference decode of its stored JPEG."""
    from PIL import Image

    seen = {"samples": 0, "reduced": 0, "flipped": 0}
    for ids, px, meta in batches:
        boxes = view_boxes(meta)
        for i in range(len(ids)):
            row = int(ids[i]) if rows_of is None else int(rows_of[ids[i]])
            assert int(meta[i, 0]) == 1, f"id {int(ids[i])}: {int(meta[i, 0])} decodes for {len(views)} views"
            assert int(meta[i, 1]) == row  # no partner: every view from the sample's own image
            nums = boxes[i, :, 5]
            assert (nums == nums[0]).all(), "views of one sample cut from differently scaled decodes"
            data, H, W = stored_jpeg(beton, row)
            img = reference_decode(data, H, W, int(nums[0]))
            if nums[0] == 8:  # the reference decoder itself agrees with PIL (RGB order, orientation)
                pil = np.asarray(Image.open(__import__("io").BytesIO(data.tobytes())).convert("RGB"))
                assert np.abs(pil.astype(int) - img).mean() < 3
            for v, spec in enumerate(views):
                y0, x0, h, w = (int(x) for x in boxes[i, v, :4])
                assert 0 <= y0 and y0 + h <= H and 0 <= x0 and x0 + w <= W
                want = reference_crop(img, boxes[i, v], spec.size)
                got = px[v][i].permute(1, 2, 0).numpy()
                assert np.array_equal(got, want), (int(ids[i]), v, np.abs(got.astype(int) - want).max())
            seen["samples"] += 1
            seen["reduced"] += int(nums[0] < 8)
            seen["flipped"] += int(boxes[i, :, 4].sum())
    return seen


# ------------------------------------------------------------------------------------------ pure functions

def test_hashed_draws_are_seed_for_streams_with_the_augspec_distribution():
    for parts in [(0, 0, 0, 0), (7, 3, 123456, 5), (2**40 + 1, 99, 1_281_166, 7)]:
        assert int(view_key(*parts)) == seed_for(*parts, FFCV_STREAM)
    spec = ViewSpec(size=32)
    lr0, lr1 = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    H, W, n = 120, 160, 20_000
    b = np.array([rrc_hashed(H, W, *spec.scale, lr0, lr1, 0.5, np.uint64(view_key(1, 2, i, 0))) for i in range(n)])
    y0, x0, h, w, flip = b.T
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= H).all() and (x0 + w <= W).all()
    ref = rrc_params(n, torch.tensor([H]), torch.tensor([W]), spec, torch.Generator().manual_seed(0)).numpy()
    for got, want in ((h * w, ref[:, 2] * ref[:, 3]), (np.log(w / h), np.log(ref[:, 3] / ref[:, 2])),
                      (x0 / (W - w + 1), ref[:, 1] / (W - ref[:, 3] + 1))):
        a, c = np.sort(got.astype(float)), np.sort(want.astype(float))
        grid = np.concatenate([a, c])
        ks = np.abs(np.searchsorted(a, grid, "right") / n - np.searchsorted(c, grid, "right") / n).max()
        assert ks < 0.02, ks  # two samples of 20k: ~1.4% at p=0.05
    assert abs(flip.mean() - 0.5) < 0.015
    # the fallback: no 10-attempt box fits a 1000x10 strip at ratio 3/4..4/3 -> the ratio-clamped center crop
    assert rrc_hashed(10, 1000, 0.9, 1.0, lr0, lr1, 0.0, np.uint64(view_key(0, 0, 0, 0)))[:4] == (0, 493, 10, 13)


# ------------------------------------------------------------------------------------------ real JPEGs

def test_cifar_multicrop_views_are_crops_of_one_decode(cifar_mc):
    beton, ld = cifar_mc
    batches = epoch_batches(ld, 0)  # the first epoch JIT-compiles the decoder (~5 s)
    assert [p.shape[-1] for p in batches[0][1]] == [32, 32, 16, 16]
    seen = check_views_are_crops_of_one_decode(beton, batches, CIFAR_VIEWS)
    assert seen["samples"] == 500 and seen["reduced"] == 0  # 32 px sources: never a reduced decode
    assert 0.4 < seen["flipped"] / (500 * 4) < 0.6


def test_imagenette_multicrop_with_dct_scaled_decodes(nette_mc):
    beton, ld = nette_mc
    batches = epoch_batches(ld, 1)
    seen = check_views_are_crops_of_one_decode(beton, batches, NETTE_VIEWS)
    # 224 px photos, 64 px global crops of >= 100 px sides: every decode is reduced (n/8 < 1) and no crop is
    # upsampled by it: each box keeps >= its output side at the decode's scale
    assert seen["samples"] == 60 and seen["reduced"] == 60
    for _, _, meta in batches:
        b = view_boxes(meta).double()
        side = torch.minimum(b[..., 2], b[..., 3]) * b[..., 5] / 8
        assert (side >= torch.tensor([v.size for v in NETTE_VIEWS]) - 0.5).all()


def test_crops_are_reproducible_and_resume_mid_epoch_continues_the_same_pixels(cifar_mc):
    _, ld = cifar_mc
    full = epoch_batches(ld, 3)
    again = epoch_batches(ld, 3)
    other = epoch_batches(ld, 4)
    for (i, p, m), (j, q, n) in zip(full, again):
        assert torch.equal(i, j) and torch.equal(m, n) and all(torch.equal(a, b) for a, b in zip(p, q))
    assert not torch.equal(torch.cat([m for _, _, m in full]), torch.cat([m for _, _, m in other]))
    ld.load_state_dict({"epoch": 3, "batches_done": 4})
    rest = [(b.index.clone(), [torch.round(v * 255).to(torch.uint8) for v in b.views], ld.last_meta.clone())
            for b in ld]
    assert len(rest) == len(full) - 4
    for (i, p, m), (j, q, n) in zip(full[4:], rest):
        assert torch.equal(i, j) and torch.equal(m, n) and all(torch.equal(a, b) for a, b in zip(p, q))
    assert ld.state_dict() == {"epoch": 3, "batches_done": len(full)}


def test_grayscale_png_folder_converts_and_trains_through_ffcv(tmp_path, cifar_folder):
    """Fashion-MNIST-like: 1-channel 28x28 PNGs (CIFAR photos in luma), converted, trained for 2 steps."""
    from PIL import Image

    from fastcl.config import load_config
    from fastcl.pipelines.folder import scan_folder
    from fastcl.train import train

    src = scan_folder(os.path.join(cifar_folder, "test"))
    root = tmp_path / "gray"
    for k, (p, y) in enumerate(zip(src.paths[::4], src.labels[::4])):
        os.makedirs(root / f"c{y}", exist_ok=True)
        Image.open(p).convert("L").resize((28, 28)).save(root / f"c{y}" / f"{k:03d}.png")
    assert Image.open(next((root / "c0").iterdir())).mode == "L"
    beton = _convert(str(root), str(tmp_path / "gray.beton"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(repo, "configs/test/tiny.yaml"),
                      ["data.backend=ffcv", f"data.path={beton}", "data.workers=1", "trainer.epochs=1",
                       "trainer.max_steps=2", f"trainer.run_dir={tmp_path / 'run'}", "data.aug.views.0.size=16",
                       "data.aug.views.1.size=16", "data.aug.mean=[0.5,0.5,0.5]", "data.aug.std=[0.25,0.25,0.25]"])
    result = train(cfg)
    assert result["steps"] == 2
    losses = [r["loss"] for r in map(__import__("json").loads, open(tmp_path / "run" / "metrics.jsonl")) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


# ------------------------------------------------------------------------------------------ 2 processes

def test_two_processes_sharded_embed_pass_and_ids_once_per_epoch(tmp_path, cifar_mc, cifar_folder):
    """torchrun, 2 gloo processes: `embed_dataset` sharded over the ranks (ffcv .beton with the center-crop
    decoder, dali, torch/PIL) gathers the same [N, D] as the 1-process pass (to 1e-5) on every rank; one epoch of
    the ffcv training loader gives each id once across the ranks, in the 1-process run's global batches."""
    import importlib.util
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_dist_embed_worker", os.path.join(here, "_dist_embed_worker.py"))
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    beton, folder = cifar_mc[0], os.path.join(cifar_folder, "train")
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                        "--nproc_per_node=2", os.path.join(here, "_dist_embed_worker.py"), str(tmp_path), beton,
                        folder], capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    one = worker.run(beton, folder)  # the 1-process pass, here (no process group)
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in (0, 1))
    assert "ffcv" in one["feats"] and set(r0["feats"]) == set(one["feats"])
    for name, f in one["feats"].items():
        assert f.shape == (500, 16)
        assert torch.allclose(r0["feats"][name], f, atol=1e-5, rtol=0), (name, (r0["feats"][name] - f).abs().max())
        assert torch.equal(r0["feats"][name], r1["feats"][name])  # every rank holds the same gathered features
    # the ffcv/dali passes read the right image for each id: close to the PIL pass (32 px, crop = whole image)
    for name in set(one["feats"]) - {"torch"}:
        cos = (one["feats"][name] * one["feats"]["torch"]).sum(1)
        assert cos.min() > 0.98, (name, cos.min())
    n_global = (500 // 64) * 64  # drop_last
    both = torch.cat([r0["ids"], r1["ids"]])
    assert len(both) == n_global and len(set(both.tolist())) == n_global
    assert torch.equal(torch.cat([r0["ids"].view(-1, 32), r1["ids"].view(-1, 32)], 1).view(-1), one["ids"])


def test_ifnd_source_pass_trains_on_ffcv(tmp_path, cifar_mc):
    """IFND `source=pass` re-embeds the training images through the .beton (center-crop decode-once pass) and
    clusters them: accepted pseudo-labels after the warm-up epoch."""
    import json

    from fastcl.config import load_config
    from fastcl.train import train

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = tmp_path / "ifnd"
    train(load_config(os.path.join(repo, "configs/test/tiny.yaml"),
                      ["data.backend=ffcv", f"data.path={cifar_mc[0]}", "data.workers=1", "data.max_samples=64",
                       "method.name=ifnd", "method.ifnd.source=pass", "method.ifnd.levels=[4,8]",
                       "method.ifnd.warmup_epochs=1", f"trainer.run_dir={run}", "trainer.epochs=2"]))
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    accepted = [r["ifnd_accepted"] for r in recs if "ifnd_accepted" in r]
    assert accepted and accepted[-1] == 1.0  # a(E) = 1: every sample of the 64 carries a pseudo-label
