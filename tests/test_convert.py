"""pipelines/convert.py: real CIFAR-10 JPEGs -> .beton (fields image, label, index) + manifest.

Reads the written file back through ffcv's Reader (metadata) and the raw pixel bytes; no ffcv Loader is built
here (each new Loader JIT-compiles for 20-38 s; the loader tests share one).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ffcv")

from fastcl.pipelines.convert import ConversionError, convert  # noqa: E402
from fastcl.pipelines.folder import scan_folder  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("airplane", "cat", "ship")


def _raw_pixels(path: str, meta_row) -> np.ndarray:
    """HxWx3 uint8 of a raw-mode image: ffcv stores raw pixels at data_ptr (a file offset)."""
    h, w = int(meta_row["height"]), int(meta_row["width"])
    return np.fromfile(path, np.uint8, count=h * w * 3, offset=int(meta_row["data_ptr"])).reshape(h, w, 3)


def _fields(path: str):
    from ffcv.reader import Reader

    r = Reader(path)
    pos = {n: i for i, n in enumerate(r.handlers)}
    return r, {n: r.metadata[f"f{i}"] for n, i in pos.items()}


@pytest.fixture()
def dirty_folder(cifar_folder, tmp_path):
    """3 classes x 6 real JPEGs + a truncated JPEG + a text file named .jpg + a grayscale and a CMYK JPEG."""
    root = tmp_path / "src"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for k in range(6):
            shutil.copy(os.path.join(cifar_folder, "train", c, f"{k:04d}.jpg"), root / c / f"{k:04d}.jpg")
    good = (root / "cat" / "0002.jpg").read_bytes()
    (root / "cat" / "0002b_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "airplane" / "0003b_notes.jpg").write_text("not an image\n")
    rgb = Image.open(root / "ship" / "0000.jpg").convert("RGB")
    rgb.convert("L").save(root / "ship" / "0000g_gray.jpg")
    rgb.convert("CMYK").save(root / "ship" / "0000h_cmyk.jpg")
    return str(root)


def test_skips_corrupt_files_and_ids_follow_scan_order(dirty_folder, tmp_path, capsys):
    out = str(tmp_path / "d.beton")
    m = convert(dirty_folder, out, write_mode="raw", workers=2, progress=False)
    err = capsys.readouterr().err
    bad = {os.path.join(dirty_folder, "cat", "0002b_truncated.jpg"),
           os.path.join(dirty_folder, "airplane", "0003b_notes.jpg")}
    assert {s["path"] for s in m["skipped"]} == bad and m["num_skipped"] == 2
    assert all(p in err for p in bad)  # named on stderr
    scan = scan_folder(dirty_folder)
    kept = [(p, y) for p, y in zip(scan.paths, scan.labels) if p not in bad]
    assert m["num_samples"] == len(kept) == 3 * 6 + 2 and m["num_scanned"] == len(scan.paths)
    assert m["classes"] == list(CLASSES) and m["class_counts"] == [6, 6, 8]
    assert m["source_modes"] == {"RGB": 18, "L": 1, "CMYK": 1}

    # manifest on disk = returned dict, checksum matches the file
    with open(out + ".json") as f:
        assert json.load(f) == m
    import hashlib

    assert hashlib.sha256(open(out, "rb").read()).hexdigest() == m["sha256"]

    reader, f = _fields(out)
    assert list(reader.handlers) == ["image", "label", "index"]
    np.testing.assert_array_equal(f["index"], np.arange(len(kept)))
    np.testing.assert_array_equal(f["label"], [y for _, y in kept])
    # pixels of every row are those of the file with that id (raw mode: exact)
    for i in (0, 7, len(kept) - 1):
        ref = np.asarray(Image.open(kept[i][0]).convert("RGB"))
        np.testing.assert_array_equal(_raw_pixels(out, f["image"][i]), ref)
    gray_row = [p for p, _ in kept].index(os.path.join(dirty_folder, "ship", "0000g_gray.jpg"))
    g = _raw_pixels(out, f["image"][gray_row])
    assert g.shape[2] == 3 and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no temp file left beside the output


def test_strict_fails_naming_the_file_and_writes_nothing(dirty_folder, tmp_path):
    out = tmp_path / "s.beton"
    # run as a script: pipelines/ is installed as fastcl.pipelines, so this also checks its absolute imports
    r = subprocess.run([sys.executable, os.path.join(REPO, "pipelines", "convert.py"), "--src", dirty_folder,
                        "--out", str(out), "--strict", "--workers", "2", "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    # the first bad file in id order is airplane/0003b_notes.jpg (airplane sorts before cat)
    assert os.path.join(dirty_folder, "airplane", "0003b_notes.jpg") in r.stderr
    assert os.listdir(tmp_path) == ["src"]  # no .beton, no manifest, no temp file


def test_existing_output_refused_without_overwrite(cifar_folder, tmp_path):
    src = os.path.join(cifar_folder, "test")
    out = str(tmp_path / "o.beton")
    m1 = convert(src, out, write_mode="jpg", jpeg_quality=80, max_samples=12, workers=1, progress=False)
    with pytest.raises(ConversionError, match="exists.*--overwrite"):
        convert(src, out, write_mode="jpg", max_samples=12, workers=1, progress=False)
    m2 = convert(src, out, write_mode="raw", max_samples=12, workers=1, overwrite=True, progress=False)
    assert m2["options"]["write_mode"] == "raw" and m2["sha256"] != m1["sha256"]
    assert m1["options"]["jpeg_quality"] == 80 and m1["num_samples"] == 12
    _, f = _fields(out)
    assert (f["image"]["mode"] == 1).all()  # 1 = raw in ffcv's IMAGE_MODES


def test_interrupted_write_leaves_no_file_under_the_final_name(cifar_folder, tmp_path, monkeypatch):
    from ffcv.writer import DatasetWriter

    def boom(self, *a, **k):
        open(self.fname, "wb").write(b"partial")  # what a killed writer leaves behind
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", boom)
    out = tmp_path / "i.beton"
    with pytest.raises(KeyboardInterrupt):
        convert(os.path.join(cifar_folder, "test"), str(out), max_samples=4, workers=1, progress=False)
    assert os.listdir(tmp_path) == []


def test_flat_folder_is_unlabelled(cifar_folder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(5):
        shutil.copy(os.path.join(cifar_folder, "test", "dog", f"{k:04d}.jpg"), flat / f"img{k}.jpg")
    m = convert(str(flat), str(tmp_path / "f.beton"), workers=1, progress=False)
    _, f = _fields(str(tmp_path / "f.beton"))
    assert m["source"]["kind"] == "flat" and m["classes"] == []
    np.testing.assert_array_equal(f["label"], [-1] * 5)
    np.testing.assert_array_equal(f["index"], np.arange(5))


def test_cifar_python_batches(tmp_path):
    """A CIFAR-10 batches dir (data_batch_1..5 / test_batch pickles) with real CIFAR pixels."""
    npz = os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg", "cifar10_batch_order.npz")
    if not os.path.isfile(npz):
        pytest.skip(f"{npz} not found")
    ref = np.load(npz)
    imgs, labels = ref["test_prefix_images"][:18], ref["test_labels"][:18].astype(int)  # lossless originals
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        sl = slice(3 * b, 3 * b + 3)
        planes = imgs[sl].transpose(0, 3, 1, 2).reshape(-1, 3072)  # the pickles store R, G, B planes
        with open(src / name, "wb") as f:
            pickle.dump({b"data": planes, b"labels": labels[sl].tolist()}, f)
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in ref["label_names"]]}, f)
    for split, rows in (("train", slice(0, 15)), ("test", slice(15, 18))):
        out = str(tmp_path / f"{split}.beton")
        m = convert(str(src), out, split=split, write_mode="raw", workers=1, progress=False)
        assert m["source"]["kind"] == "cifar10-batches" and m["classes"] == list(ref["label_names"])
        _, f = _fields(out)
        np.testing.assert_array_equal(f["label"], labels[rows])
        np.testing.assert_array_equal(f["index"], np.arange(len(labels[rows])))
        for i in range(len(f["index"])):
            np.testing.assert_array_equal(_raw_pixels(out, f["image"][i]), imgs[rows][i])


@pytest.mark.timeout(180)
def test_image_larger_than_ffcv_default_page(tmp_path):
    """A raw 1800x1800 image (9.7 MB) exceeds ffcv's 8 MiB default page; its writer process would die and the
    parent wait forever. convert() sizes the page from the largest image found during verification."""
    src = tmp_path / "big"
    src.mkdir()
    y, x = np.mgrid[0:1800, 0:1800]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(src / "a.png")
    out = str(tmp_path / "big.beton")
    m = convert(str(src), out, write_mode="raw", workers=1, progress=False)
    _, f = _fields(out)
    assert m["num_samples"] == 1 and int(f["image"]["width"][0]) == 1800
    m = convert(str(src), out, write_mode="raw", max_resolution=300, workers=1, overwrite=True, progress=False)
    _, f = _fields(out)
    assert int(f["image"]["width"][0]) == 300 and m["options"]["max_resolution"] == 300
