"""Data sets: class subsets (`data.classes`, `convert.py --classes`) identical through torch, ffcv and
DALI on real Imagenette photos (ImageNet wnids); STL-10's binary layout (a small file in the official layout
written here from 96x96 crops of real photos): convert, folder export, train+unlabelled as one id space;
CIFAR-100 python batches (fine labels, coarse kept for diagnostics)."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fastcl.pipelines import build_loader
from fastcl.pipelines.folder import load_rgb, read_class_list, scan_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(backend: str, path: str, classes=None, batch: int = 8):
    from conftest import make_cfg

    cfg = make_cfg(backend, path, batch=batch, drop_last=False, workers=1)
    cfg.data.classes = classes
    return cfg


def _epoch(loader, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    loader.set_epoch(epoch)
    batches = list(loader)
    return torch.cat([b.index for b in batches]).cpu(), torch.cat([b.label for b in batches]).cpu()


def _raw_pixels(beton: str):
    """{index: HxWx3 uint8} of a raw-mode .beton, read from the file (no ffcv Loader, no JIT)."""
    from ffcv.reader import Reader

    r = Reader(beton)
    pos = {n: i for i, n in enumerate(r.handlers)}
    img, idx = r.metadata[f"f{pos['image']}"], r.metadata[f"f{pos['index']}"]
    out = {}
    for row in range(len(idx)):
        h, w = int(img[row]["height"]), int(img[row]["width"])
        out[int(idx[row])] = np.fromfile(beton, np.uint8, count=h * w * 3,
                                          offset=int(img[row]["data_ptr"])).reshape(h, w, 3)
    return out


# ------------------------------------------------------------------------------------------ class subsets

@pytest.fixture(scope="module")
def subset(imagenette_folder, tmp_path_factory):
    root = os.path.join(imagenette_folder, "train")
    all_classes = sorted(os.listdir(root))
    assert len(all_classes) == 3
    wanted = [all_classes[2], all_classes[0]]  # listed out of order: ids follow the SORTED names
    tmp = tmp_path_factory.mktemp("subset")
    listing = tmp / "classes.txt"
    listing.write_text(f"# two Imagenette classes\n{wanted[0]}\n\n{wanted[1]}  # trailing comment\n")
    full = scan_folder(root)
    keep = sorted(wanted)
    # the reference: a hand-made folder holding only those class folders (what users did with symlinks)
    ref_root = tmp / "ref"
    ref_root.mkdir()
    for c in keep:
        os.symlink(os.path.join(root, c), ref_root / c)
    ref = scan_folder(str(ref_root))
    return dict(root=root, listing=str(listing), keep=keep, full=full, ref=ref, tmp=tmp)


def test_class_list_file_and_scan(subset):
    assert read_class_list(subset["listing"]) == [subset["keep"][1], subset["keep"][0]]
    idx = scan_folder(subset["root"], classes=read_class_list(subset["listing"]))
    ref = subset["ref"]
    assert idx.classes == subset["keep"] == ref.classes
    assert [os.path.basename(p) for p in idx.paths] == [os.path.basename(p) for p in ref.paths]
    assert idx.labels == ref.labels and sorted(set(idx.labels)) == [0, 1] and len(idx) == 40
    with pytest.raises(ValueError, match=r"'n99999999' is not a class folder"):
        scan_folder(subset["root"], classes=["n99999999", subset["keep"][0]])
    with pytest.raises(ValueError, match="listed more than once"):
        read_class_list([subset["keep"][0], subset["keep"][0]])
    assert read_class_list(os.path.join("configs", "data", "imagenet100_classes.txt"))[:2] == ["n02869837",
                                                                                                   "n01749939"]
    assert len(read_class_list(os.path.join(REPO, "configs", "data", "imagenet100_classes.txt"))) == 100


def test_subset_same_ids_and_labels_torch_ffcv_dali(subset):
    """The same class list through torch, ffcv (converted with --classes) and DALI: every id 0..N-1 once per epoch,
    the same ids in the same batches, the same label per id, and the same image per id (raw .beton pixels =
    the decoded file the folder backends read for that id)."""
    pytest.importorskip("ffcv")
    pytest.importorskip("nvidia.dali")
    from fastcl.pipelines.convert import ConversionError, convert
    from fastcl.pipelines.ffcv_loader import read_beton_fields

    ref = subset["ref"]
    want = torch.tensor(ref.labels)
    n = len(ref)
    beton = str(subset["tmp"] / "sub.beton")
    m = convert(subset["root"], beton, write_mode="raw", workers=1, progress=False, classes=subset["listing"])
    assert m["classes"] == subset["keep"] and m["num_samples"] == n and m["source"]["class_subset"]
    index, labels = read_beton_fields(beton)
    np.testing.assert_array_equal(labels[np.argsort(index)], ref.labels)
    pixels = _raw_pixels(beton)
    for i in (0, n // 2 - 1, n // 2, n - 1):  # both classes, both ends
        np.testing.assert_array_equal(pixels[i], np.asarray(load_rgb(ref.paths[i])))

    got = {}
    for backend, path in (("torch", subset["root"]), ("dali", subset["root"]), ("ffcv", beton)):
        ld = build_loader(_cfg(backend, path, subset["listing"]), 0, 1, "cpu")
        assert ld.num_samples == n
        ids, labs = _epoch(ld, 1)
        assert torch.equal(ids.sort().values, torch.arange(n)), backend
        assert torch.equal(labs, want[ids]), backend
        got[backend] = ids
    assert torch.equal(got["torch"], got["ffcv"]) and torch.equal(got["torch"], got["dali"])

    # a .beton of ALL classes under the same data.classes is refused, naming the difference and the fix
    full = str(subset["tmp"] / "full.beton")
    convert(subset["root"], full, write_mode="jpg", workers=1, progress=False)
    with pytest.raises(ValueError, match=r"holds 3: it also holds class .*--classes"):
        build_loader(_cfg("ffcv", full, subset["listing"]), 0, 1, "cpu")
    with pytest.raises(ConversionError, match="n99999999"):
        convert(subset["root"], str(subset["tmp"] / "bad.beton"), workers=1, progress=False,
                classes=["n99999999"])


def test_subset_eval_paths_and_unknown_class_in_training(subset, tmp_path):
    from fastcl.pipelines.eval_data import eval_batches
    from fastcl.train import main

    aug = _cfg("torch", subset["root"]).data.aug
    # one batch: the whole (small) folder
    x, y, ids = next(eval_batches(subset["root"], aug, 1 << 30, workers=1, classes=read_class_list(subset["listing"])))
    assert torch.equal(y, torch.tensor(subset["ref"].labels)) and len(x) == len(subset["ref"])
    # an unknown class fails before training, naming it
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{subset['keep'][0]}\nn00000042\n")
    code = main(["--config", os.path.join(REPO, "configs", "test", "tiny.yaml"), "data.backend=torch",
                 f"data.path={subset['root']}", f"data.classes={bad}", f"trainer.run_dir={tmp_path / 'run'}"])
    assert code == 2 and not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ STL-10

def _crops(imagenette_folder: str, n: int) -> list[np.ndarray]:
    """n distinct 96x96 crops (the STL-10 size) of real photos."""
    root = os.path.join(imagenette_folder, "train")
    paths = [p for p in scan_folder(root).paths][:: max(1, 60 // n)][:n]
    out = []
    for k, p in enumerate(paths):
        a = np.asarray(load_rgb(p))
        y, x = 10 + 7 * k % 100, 30 + 11 * k % 90
        out.append(np.ascontiguousarray(a[y:y + 96, x:x + 96]))
    return out


def _write_stl(folder, images: list[np.ndarray], labels: list[int] | None, split: str) -> None:
    """The official layout: each image 3 planes, each plane column-major (x outer, y inner); labels 1..10."""
    folder.mkdir(exist_ok=True)
    np.stack([im.transpose(2, 1, 0) for im in images]).tofile(folder / f"{split}_X.bin")
    if labels is not None:
        np.asarray(labels, dtype=np.uint8).tofile(folder / f"{split}_y.bin")


@pytest.fixture(scope="module")
def stl(imagenette_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stl")
    crops = _crops(imagenette_folder, 14)
    src = tmp / "stl10_binary"
    train, train_y = crops[:6], [3, 1, 10, 1, 3, 2]
    test, test_y = crops[6:9], [2, 2, 1]
    unl = crops[9:]
    _write_stl(src, train, train_y, "train")
    _write_stl(src, test, test_y, "test")
    _write_stl(src, unl, None, "unlabeled")
    order = sorted(range(6), key=lambda i: (train_y[i], i))  # documented: (label, position in the file)
    return dict(tmp=tmp, src=str(src), train=train, train_y=train_y, unl=unl, order=order,
                expect_images=[train[i] for i in order] + unl,
                expect_labels=[train_y[i] - 1 for i in order] + [-1] * len(unl))


def test_stl10_reader_layout_order_and_bad_files(stl, tmp_path):
    from fastcl.pipelines.sources import SourceError, read_stl10

    s = read_stl10(stl["src"], "train+unlabeled")
    assert s.labels.tolist() == stl["expect_labels"]
    assert s.classes[0] == "airplane" and s.classes[9] == "truck"
    for i, want in enumerate(stl["expect_images"]):
        np.testing.assert_array_equal(s.images[i], want)  # orientation: a transposed photo would differ
    assert read_stl10(stl["src"], "test").labels.tolist() == [0, 1, 1]
    bad = tmp_path / "bad"
    _write_stl(bad, stl["train"][:2], [1, 11], "train")
    with pytest.raises(SourceError, match=r"train_y.bin: label 11 at position 1"):
        read_stl10(str(bad), "train")
    (bad / "unlabeled_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(SourceError, match="not a whole number"):
        read_stl10(str(bad), "unlabeled")


def test_stl10_convert_and_folders_share_one_id_space(stl):
    """convert.py --split train+unlabeled (.beton) and the exported folders `train:unlabeled` (torch backend) give
    the same image and label for every id; unlabelled images have label -1."""
    pytest.importorskip("ffcv")
    from fastcl.pipelines.convert import convert
    from fastcl.pipelines.ffcv_loader import read_beton_fields
    from fastcl.pipelines.sources import main as export_main

    beton = str(stl["tmp"] / "stl_train_unl.beton")
    m = convert(stl["src"], beton, split="train+unlabeled", write_mode="raw", workers=1, progress=False)
    assert m["source"]["kind"] == "stl10-binary" and m["num_samples"] == len(stl["expect_labels"]) == 11
    index, labels = read_beton_fields(beton)
    np.testing.assert_array_equal(labels[np.argsort(index)], stl["expect_labels"])
    pixels = _raw_pixels(beton)
    for i, want in enumerate(stl["expect_images"]):
        np.testing.assert_array_equal(pixels[i], want)

    out = stl["tmp"] / "stl10"
    for split in ("train", "unlabeled"):
        assert export_main(["--src", stl["src"], "--split", split, "--out", str(out / split), "--workers", "1"]) == 0
    path = f"{out / 'train'}{os.pathsep}{out / 'unlabeled'}"
    idx = scan_folder(path)
    assert idx.labels == stl["expect_labels"] and idx.classes[0] == "airplane"
    for i, want in enumerate(stl["expect_images"]):
        np.testing.assert_array_equal(np.asarray(load_rgb(idx.paths[i])), want)  # PNG: lossless
    ld = build_loader(_cfg("torch", path, batch=4), 0, 1, "cpu")
    ids, labs = _epoch(ld)
    assert torch.equal(ids.sort().values, torch.arange(11))
    assert torch.equal(labs, torch.tensor(stl["expect_labels"])[ids])


# ------------------------------------------------------------------------------------------ CIFAR-100

def _coarse_of_classes(folder: str, classes: list[str]) -> list[int]:
    """Superclass id (CIFAR-100's coarse label, 0..19) of each class of `folder`'s scan (`classes`), read from the
    `coarse_labels.json` an export wrote; -1 for a class that had no image in the exported split."""
    with open(os.path.join(folder, "coarse_labels.json")) as f:
        d = json.load(f)
    pos = {c: i for i, c in enumerate(d["coarse_classes"])}
    return [pos[d["fine_to_coarse"][c]] if c in d["fine_to_coarse"] else -1 for c in classes]


def test_cifar100_python_fine_labels_and_coarse_for_diagnostics(cifar_folder, tmp_path):
    pytest.importorskip("ffcv")
    from fastcl.pipelines.convert import convert
    from fastcl.pipelines.ffcv_loader import read_beton_fields
    from fastcl.pipelines.sources import export_folder, read_cifar100

    paths = scan_folder(os.path.join(cifar_folder, "train")).paths[::50][:10]  # 10 real 32x32 photos
    imgs = np.stack([np.asarray(load_rgb(p)) for p in paths])
    fine = [7, 3, 99, 3, 0, 7, 42, 99, 0, 1]
    coarse_of = {0: 4, 1: 1, 3: 8, 7: 7, 42: 8, 99: 19}
    src = tmp_path / "cifar-100-python"
    src.mkdir()
    for split, sl in (("train", slice(0, 7)), ("test", slice(7, 10))):
        with open(src / split, "wb") as f:
            pickle.dump({b"data": imgs[sl].transpose(0, 3, 1, 2).reshape(-1, 3072), b"fine_labels": fine[sl],
                         b"coarse_labels": [coarse_of[x] for x in fine[sl]],
                         b"filenames": [b"x.png"] * len(fine[sl])}, f)
    fine_names = [f"f{i:02d}" for i in range(100)]
    coarse_names = [f"c{i:02d}" for i in range(20)]
    with open(src / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in fine_names],
                     b"coarse_label_names": [n.encode() for n in coarse_names]}, f)
    s = read_cifar100(str(src), "train")
    assert s.labels.tolist() == fine[:7] and s.coarse_labels.tolist() == [coarse_of[x] for x in fine[:7]]
    np.testing.assert_array_equal(s.images, imgs[:7])
    beton = str(tmp_path / "c100.beton")
    m = convert(str(src), beton, split="test", write_mode="raw", workers=1, progress=False)
    assert m["source"]["kind"] == "cifar100-python" and m["classes"] == fine_names
    assert m["coarse_classes"] == coarse_names and m["coarse_of_class"][99] == 19  # diagnostics (test split)
    _, labels = read_beton_fields(beton)
    assert labels.tolist() == fine[7:]
    np.testing.assert_array_equal(_raw_pixels(beton)[1], imgs[8])
    out = tmp_path / "c100_train"
    export_folder(str(src), "train", str(out), workers=1)
    idx = scan_folder(str(out))
    assert idx.classes == fine_names  # all 100 class folders (f00..f99 sort like the fine label ids)
    assert idx.labels == sorted(fine[:7])
    coarse = _coarse_of_classes(str(out), idx.classes)  # superclass id per fine class, from the export
    assert [coarse[f] for f in fine[:7]] == [coarse_of[f] for f in fine[:7]]
    assert coarse[5] == -1  # f05 has no image in this split: unknown
    assert json.loads((out / "export.json").read_text())["kind"] == "cifar100-python"
