"""Array datasets shipped as binary files: readers for convert.py, and an export to image folders.

    python -m fastcl.pipelines.sources --src stl10_binary --split train --out data/stl10/train
    python -m fastcl.pipelines.sources --src stl10_binary --split unlabeled --out data/stl10/unlabeled
    python -m fastcl.pipelines.sources --src cifar-100-python --split train --out data/cifar100/train

Formats:
- CIFAR-10 python batches (`data_batch_1..5`, `test_batch`, `batches.meta`): rows of 3072 bytes (R, G, B planes
  of 32x32), `labels`.
- CIFAR-100 python (`train`, `test`, `meta`): the same rows, `fine_labels` (0..99, the training label) and
  `coarse_labels` (0..19 superclasses); `meta` holds `fine_label_names` / `coarse_label_names`. The coarse labels
  are kept (`ArraySource.coarse_labels`, `coarse_classes`) for diagnostics; an export writes them to
  `<out>/coarse_labels.json` (superclass names + fine class name -> superclass name; every fine class has exactly
  one).
- STL-10 binary (`stl10_binary/`: `train_X.bin` + `train_y.bin` (5,000), `test_X.bin` + `test_y.bin` (8,000),
  `unlabeled_X.bin` (100,000), `class_names.txt`): each image 3*96*96 uint8 stored channel by channel in
  COLUMN-major order (the reference reader: reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1) -> HWC); labels are
  uint8 1..10 (-> 0..9); unlabelled images get label -1. The files are memory-mapped (unlabeled_X.bin is 2.6 GB).

Sample order (= global ids in a .beton) for STL-10: labelled images sorted by (label, position in the file),
then, for `train+unlabeled`, the unlabelled images in file order. That is exactly the `scan_folder` order of the
exported folders (`<class>/<position:05d>.png`, `<position:06d>.png` for unlabelled) with
`data.path=OUT/train:OUT/unlabeled`, so the ffcv and folder backends number the images identically. CIFAR keeps
the pickle order in a .beton (as before); its exported folder is class-sorted like any folder.
Exports are PNG (lossless): the folder backends decode the same pixels the `raw` .beton holds.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from dataclasses import dataclass

import numpy as np

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
STL_SPLITS = ("train", "test", "unlabeled", "train+unlabeled")
STL_SIDE = 96
STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


class SourceError(RuntimeError):
    """A dataset file that cannot be read as its format; the message names the file."""


@dataclass
class ArraySource:
    kind: str  # "cifar10-batches" | "cifar100-python" | "stl10-binary"
    images: object  # [N,H,W,3] uint8: an ndarray, or StlImages (indexable, .shape)
    labels: np.ndarray  # [N] int64, -1 = unlabelled
    classes: list[str]
    coarse_labels: np.ndarray | None = None  # CIFAR-100 superclass per sample (diagnostics only)
    coarse_classes: list[str] | None = None


# ---------------------------------------------------------------- detection

def is_cifar10(src: str) -> bool:
    return os.path.isdir(src) and any(os.path.isfile(os.path.join(src, b)) for b in CIFAR10_TRAIN + CIFAR10_TEST)


def is_cifar100(src: str) -> bool:
    return os.path.isdir(src) and os.path.isfile(os.path.join(src, "meta")) and any(
        os.path.isfile(os.path.join(src, b)) for b in ("train", "test"))


def is_stl10(src: str) -> bool:
    return os.path.isdir(src) and any(os.path.isfile(os.path.join(src, f"{s}_X.bin"))
                                      for s in ("train", "test", "unlabeled"))


def detect(src: str) -> str | None:
    """The array format of directory `src`, or None (an image folder)."""
    for kind, test in (("cifar10-batches", is_cifar10), ("cifar100-python", is_cifar100), ("stl10-binary", is_stl10)):
        if test(src):
            return kind
    return None


def load(src: str, split: str, max_samples: int = 0) -> ArraySource:
    kind = detect(src)
    if kind is None:
        raise SourceError(f"{src}: not a CIFAR-10/CIFAR-100 python or STL-10 binary directory")
    reader = {"cifar10-batches": read_cifar10, "cifar100-python": read_cifar100, "stl10-binary": read_stl10}[kind]
    s = reader(src, split)
    if max_samples > 0 and max_samples < len(s.labels):
        s.images = s.images[:max_samples] if isinstance(s.images, np.ndarray) else s.images.head(max_samples)
        s.labels = s.labels[:max_samples]
        if s.coarse_labels is not None:
            s.coarse_labels = s.coarse_labels[:max_samples]
    return s


# ---------------------------------------------------------------- CIFAR

def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad batch file
        raise SourceError(f"{path}: not a readable CIFAR python batch ({type(e).__name__}: {e})") from e


def _rows_to_hwc(data, path: str, n_labels: int) -> np.ndarray:
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or n_labels != len(data):
        raise SourceError(f"{path}: expected data [N,3072] and N labels, got {data.shape} / {n_labels}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC


def read_cifar10(src: str, split: str) -> ArraySource:
    """CIFAR-10 python pickles -> images [N,32,32,3] uint8 in the original batch order."""
    names = {"train": CIFAR10_TRAIN, "test": CIFAR10_TEST}.get(split)
    if names is None:
        raise SourceError(f"--split must be train or test for a CIFAR-10 batches dir, got {split!r}")
    images, labels = [], []
    for name in names:
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            raise SourceError(f"CIFAR-10 batches dir {src}: missing {name} (needed for split={split})")
        d = _unpickle(path)
        lab = np.asarray(d.get(b"labels", d.get(b"fine_labels")), dtype=np.int64)
        images.append(_rows_to_hwc(d.get(b"data"), path, len(lab)))
        labels.append(lab)
    meta = os.path.join(src, "batches.meta")
    classes = [str(i) for i in range(10)]
    if os.path.isfile(meta):
        classes = [c.decode() for c in _unpickle(meta)[b"label_names"]]
    return ArraySource("cifar10-batches", np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels),
                       classes)


def read_cifar100(src: str, split: str) -> ArraySource:
    """CIFAR-100 python (`train` / `test` + `meta`) -> images [N,32,32,3] uint8 in file order, FINE labels;
    coarse labels and names kept for diagnostics."""
    if split not in ("train", "test"):
        raise SourceError(f"--split must be train or test for a CIFAR-100 python dir, got {split!r}")
    path = os.path.join(src, split)
    if not os.path.isfile(path):
        raise SourceError(f"CIFAR-100 python dir {src}: missing {split} (needed for split={split})")
    d = _unpickle(path)
    if b"fine_labels" not in d or b"coarse_labels" not in d:
        raise SourceError(f"{path}: no fine_labels/coarse_labels: not a CIFAR-100 python file")
    fine = np.asarray(d[b"fine_labels"], dtype=np.int64)
    coarse = np.asarray(d[b"coarse_labels"], dtype=np.int64)
    images = np.ascontiguousarray(_rows_to_hwc(d[b"data"], path, len(fine)))
    meta = _unpickle(os.path.join(src, "meta"))
    fine_names = [c.decode() for c in meta[b"fine_label_names"]]
    coarse_names = [c.decode() for c in meta[b"coarse_label_names"]]
    if fine.size and (fine.min() < 0 or fine.max() >= len(fine_names)):
        raise SourceError(f"{path}: fine labels outside 0..{len(fine_names) - 1}")
    return ArraySource("cifar100-python", images, fine, fine_names, coarse, coarse_names)


def coarse_of_fine(fine: np.ndarray, coarse: np.ndarray, n_fine: int) -> list[int]:
    """Superclass of each fine class (CIFAR-100: a function of the fine class). Fails if a fine class maps to
    two superclasses (a corrupt file)."""
    out = [-1] * n_fine
    for f, c in set(zip(fine.tolist(), coarse.tolist())):
        if out[f] not in (-1, c):
            raise SourceError(f"fine class {f} appears with superclasses {out[f]} and {c}")
        out[f] = c
    return out


# ---------------------------------------------------------------- STL-10

class StlImages:
    """Indexable [N,96,96,3] uint8 view of STL-10 `*_X.bin` files (memory-mapped, opened lazily so that a copy
    pickled into a worker process re-opens the files instead of carrying the pixels)."""

    def __init__(self, files: list[str], order: list[tuple[int, int]]):
        self.files, self.order = files, order  # order[i] = (file number, image number in that file)
        self._maps: list[np.memmap] | None = None
        self.shape = (len(order), STL_SIDE, STL_SIDE, 3)
        self.dtype = np.uint8

    def __getstate__(self):
        return {"files": self.files, "order": self.order, "shape": self.shape, "dtype": self.dtype}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._maps = None

    def __len__(self) -> int:
        return len(self.order)

    def head(self, n: int) -> "StlImages":
        return StlImages(self.files, self.order[:n])

    def __getitem__(self, i: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [np.memmap(f, dtype=np.uint8, mode="r").reshape(-1, 3, STL_SIDE, STL_SIDE)
                          for f in self.files]
        f, j = self.order[int(i)]
        return np.ascontiguousarray(self._maps[f][j].transpose(2, 1, 0))  # C,W,H (column-major) -> H,W,C


def _stl_count(path: str) -> int:
    size = os.path.getsize(path)
    per = 3 * STL_SIDE * STL_SIDE
    if size == 0 or size % per:
        raise SourceError(f"{path}: {size} bytes is not a whole number of 3x96x96 STL-10 images ({per} bytes each)")
    return size // per


def read_stl10(src: str, split: str) -> ArraySource:
    """STL-10 binary dir -> ArraySource in the documented order (labelled by (label, position); unlabelled after)."""
    if split not in STL_SPLITS:
        raise SourceError(f"--split must be one of {list(STL_SPLITS)} for an STL-10 binary dir, got {split!r}")
    parts = split.split("+")
    files, order, labels = [], [], []
    for part in parts:
        xp = os.path.join(src, f"{part}_X.bin")
        if not os.path.isfile(xp):
            raise SourceError(f"STL-10 binary dir {src}: missing {part}_X.bin (needed for split={split})")
        n = _stl_count(xp)
        fno = len(files)
        files.append(xp)
        if part == "unlabeled":
            order += [(fno, j) for j in range(n)]
            labels.append(np.full(n, -1, dtype=np.int64))
            continue
        yp = os.path.join(src, f"{part}_y.bin")
        if not os.path.isfile(yp):
            raise SourceError(f"STL-10 binary dir {src}: missing {part}_y.bin (labels of {part}_X.bin)")
        y = np.fromfile(yp, dtype=np.uint8).astype(np.int64)
        if len(y) != n:
            raise SourceError(f"{yp}: {len(y)} labels for the {n} images of {xp}")
        if n and (y.min() < 1 or y.max() > 10):
            bad = int(np.flatnonzero((y < 1) | (y > 10))[0])
            raise SourceError(f"{yp}: label {y[bad]} at position {bad} outside 1..10")
        y -= 1
        pos = np.argsort(y, kind="stable")  # (label, position in the file)
        order += [(fno, int(j)) for j in pos]
        labels.append(y[pos])
    classes = list(STL_CLASSES)
    names = os.path.join(src, "class_names.txt")
    if os.path.isfile(names):
        with open(names) as f:
            listed = [ln.strip() for ln in f if ln.strip()]
        if len(listed) == 10:
            classes = listed
    return ArraySource("stl10-binary", StlImages(files, order), np.concatenate(labels), classes)


def stl_positions(src: ArraySource) -> list[tuple[int, int]]:
    return list(src.images.order) if isinstance(src.images, StlImages) else [(0, i) for i in range(len(src.labels))]


# ---------------------------------------------------------------- export to folders

def _write_png(job) -> None:
    from PIL import Image

    images, i, path = job
    Image.fromarray(np.asarray(images[i])).save(path, compress_level=1)


def export_folder(src: str, split: str, out: str, workers: int = 0, max_samples: int = 0) -> dict:
    """Write split `split` of the array dataset `src` as PNGs under `out`: labelled images to
    `out/<class>/<position>.png`, unlabelled ones to `out/<position>.png` (a flat folder), position = index in
    the original file, zero-padded so that sorted names keep the file order. One split per folder: combine
    folders with `data.path=A:B` (one id space). Returns a summary (also written to out/export.json)."""
    s = load(src, split, max_samples)
    if (s.labels >= 0).any() and (s.labels < 0).any():
        raise SourceError(f"split {split!r} mixes labelled and unlabelled images; export them one split at a time "
                          "(e.g. train and unlabeled) and train on data.path=OUT/train:OUT/unlabeled")
    if os.path.exists(out) and os.listdir(out):
        raise SourceError(f"--out {out} exists and is not empty")
    os.makedirs(out, exist_ok=True)
    if (s.labels >= 0).any():  # every class folder, even one with no image here: labels stay the class positions
        for c in s.classes:
            os.makedirs(os.path.join(out, c), exist_ok=True)
    width = max(5, len(str(len(s.labels))))
    pos = stl_positions(s) if s.kind == "stl10-binary" else [(0, i) for i in range(len(s.labels))]
    jobs = []
    for i, (lab, (_, p)) in enumerate(zip(s.labels.tolist(), pos)):
        folder = out if lab < 0 else os.path.join(out, s.classes[lab])
        os.makedirs(folder, exist_ok=True)
        jobs.append((s.images, i, os.path.join(folder, f"{p:0{width}d}.png")))
    workers = workers or (os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 256:
        import multiprocessing as mp

        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            pool.map(_write_png, jobs, chunksize=256)
    else:
        for j in jobs:
            _write_png(j)
    summary = {"source": os.path.abspath(src), "kind": s.kind, "split": split, "num_samples": len(jobs),
               "classes": s.classes if (s.labels >= 0).any() else []}
    if s.coarse_labels is not None:
        cof = coarse_of_fine(s.labels, s.coarse_labels, len(s.classes))
        coarse = {"coarse_classes": s.coarse_classes,
                  "fine_to_coarse": {s.classes[f]: s.coarse_classes[c] for f, c in enumerate(cof) if c >= 0}}
        with open(os.path.join(out, "coarse_labels.json"), "w") as f:
            json.dump(coarse, f, indent=1)
        summary["coarse_classes"] = s.coarse_classes
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="CIFAR-10/100 python dir or STL-10 binary dir")
    p.add_argument("--split", required=True, help="train | test (CIFAR); train | test | unlabeled (STL-10)")
    p.add_argument("--out", required=True, help="output image folder (must not exist or be empty)")
    p.add_argument("--workers", type=int, default=0, help="PNG writer processes; 0 = all cores")
    p.add_argument("--max-samples", type=int, default=0)
    a = p.parse_args(argv)
    try:
        s = export_folder(a.src, a.split, a.out, a.workers, a.max_samples)
    except SourceError as e:
        print(f"sources: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s['num_samples']} images of {s['kind']} {s['split']} to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
