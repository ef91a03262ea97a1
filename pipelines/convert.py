"""Dataset -> FFCV .beton with fields `image`, `label`, `index`, plus a JSON manifest.

    python pipelines/convert.py --src data/imagenette2-224/train --out imagenette_train.beton --write-mode jpg
    python pipelines/convert.py --src cifar-10-batches-py --split test --out cifar_test.beton --write-mode raw

Fields (in this order):
- `image`: ffcv RGBImageField. Grayscale, palette, CMYK and RGBA sources are converted to RGB (alpha dropped).
- `label`: IntField, the class position in the sorted class list; -1 for a flat (unlabelled) folder.
- `index`: IntField, the GLOBAL sample id 0..N-1 = row of the .beton = position in `scan_folder` order
  (sorted class folders, sorted files inside each), or in the pickle order for CIFAR-10 batches. Skipped
  (corrupt) files are removed BEFORE numbering, so ids stay contiguous; when nothing is skipped they equal
  the ids the torch and dali backends give the same folder. The manifest lists every skipped file.

Sources: an image folder with one sub-folder per class (ImageNet train layout, Imagenette, CIFAR-10 JPEGs),
a flat folder of images (unlabelled), or a CIFAR-10 python batches directory (data_batch_1..5 / test_batch;
`--split train|test` picks which).

Safety: every image is opened and fully decoded up front in a process pool; unreadable files are skipped,
counted, named on stderr and listed in the manifest (`--strict`: the first one fails the run, naming it, and
nothing is written). The .beton is written to a temporary file in the output directory and moved into place
with os.replace only when complete, so an interrupted run never leaves a truncated file under the final name.
An existing output is refused unless --overwrite. `OUT.beton.json` records source, counts, classes, skipped
files, writer options, versions, duration and the sha256 of the .beton.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import sys
import time
from dataclasses import dataclass

import numpy as np

from fastcl.pipelines.folder import scan_folder

WRITE_MODES = ("jpg", "raw", "smart", "proportion")
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCHES = ("test_batch",)


class ConversionError(RuntimeError):
    """A conversion that cannot proceed; the message names the offending file or option."""


@dataclass
class _Source:
    kind: str  # "folder" | "flat" | "cifar10-batches"
    labels: np.ndarray  # [N] int64, -1 = unlabelled
    classes: list[str]
    paths: list[str] | None = None  # image files (folder kinds)
    images: np.ndarray | None = None  # [N,H,W,3] uint8 (cifar10-batches)


# ---------------------------------------------------------------- sources

def _is_cifar_batches(src: str) -> bool:
    return os.path.isdir(src) and any(os.path.isfile(os.path.join(src, b))
                                      for b in CIFAR_TRAIN_BATCHES + CIFAR_TEST_BATCHES)


def _load_cifar_batches(src: str, split: str, max_samples: int) -> _Source:
    """CIFAR-10 python pickles -> images [N,32,32,3] uint8 in the original batch order."""
    names = {"train": CIFAR_TRAIN_BATCHES, "test": CIFAR_TEST_BATCHES}.get(split)
    if names is None:
        raise ConversionError(f"--split must be train or test for a CIFAR-10 batches dir, got {split!r}")
    images, labels = [], []
    for name in names:
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            raise ConversionError(f"CIFAR-10 batches dir {src}: missing {name} (needed for split={split})")
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data = np.asarray(d[b"data"], dtype=np.uint8)
            lab = np.asarray(d.get(b"labels", d.get(b"fine_labels")), dtype=np.int64)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad batch file
            raise ConversionError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from e
        if data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
            raise ConversionError(f"{path}: expected data [N,3072] and N labels, got {data.shape} / {lab.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW planes -> HWC
        labels.append(lab)
    meta = os.path.join(src, "batches.meta")
    classes = [str(i) for i in range(10)]
    if os.path.isfile(meta):
        with open(meta, "rb") as f:
            classes = [c.decode() for c in pickle.load(f, encoding="bytes")[b"label_names"]]
    imgs, labs = np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
    if max_samples > 0:
        imgs, labs = imgs[:max_samples], labs[:max_samples]
    return _Source("cifar10-batches", labs, classes, images=imgs)


def _load_source(src: str, split: str, max_samples: int) -> _Source:
    if not os.path.isdir(src):
        raise ConversionError(f"--src {src}: not a directory")
    if _is_cifar_batches(src):
        return _load_cifar_batches(src, split, max_samples)
    try:
        idx = scan_folder(src, max_samples=max_samples)
    except (FileNotFoundError, ValueError) as e:  # empty folder, images mixed with class folders
        raise ConversionError(f"--src {src}: {e}") from e
    labels = np.asarray(idx.labels, dtype=np.int64)
    return _Source("flat" if not idx.classes else "folder", labels, list(idx.classes), paths=list(idx.paths))


# ---------------------------------------------------------------- verification

def _verify(path: str) -> tuple[str, int, str | None]:
    """Open and fully decode one file. Returns (mode, height * width, None) or ("", 0, reason). Runs in the
    worker pool."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            im.load()  # decodes every byte: catches truncated files that open() alone accepts
            im.convert("RGB")  # modes PIL cannot map to RGB fail here rather than inside the writer
            return mode, im.width * im.height, None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        return "", 0, f"{type(e).__name__}: {e}"


def _verify_all(paths: list[str], workers: int, strict: bool,
                progress: bool) -> tuple[list[int], list[dict], dict, int]:
    """Decode every file in a pool. Returns (good positions, skipped records, {mode: count}, max pixels)."""
    from tqdm import tqdm

    good, skipped, modes, max_pixels = [], [], {}, 0
    # forkserver, not fork: a fork of a process that already runs threads (torch/OpenMP/numba pools, e.g. inside a
    # test session or a notebook) can deadlock in the child on a lock held by a thread that did not survive the
    # fork (seen: a verify worker stuck in a futex for minutes). The server forks from a clean single thread.
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    chunk = max(1, min(64, len(paths) // (workers * 8) or 1))
    with ctx.Pool(workers) as pool:
        it = pool.imap(_verify, paths, chunksize=chunk)  # ordered: "first bad file" is in id order
        for pos, (mode, pixels, err) in enumerate(tqdm(it, total=len(paths), desc="verify", disable=not progress,
                                                       file=sys.stderr)):
            if err is None:
                good.append(pos)
                modes[mode] = modes.get(mode, 0) + 1
                max_pixels = max(max_pixels, pixels)
                continue
            if strict:
                pool.terminate()
                raise ConversionError(f"{paths[pos]}: unreadable image ({err}); --strict stops here, nothing written")
            print(f"convert: skipping {paths[pos]}: {err}", file=sys.stderr)
            skipped.append({"path": paths[pos], "scan_position": pos, "reason": err})
    return good, skipped, modes, max_pixels


def _page_size(max_pixels: int, max_resolution: int | None) -> int:
    """ffcv page size (a power of two >= 8 MiB) that holds the largest stored image: a sample larger than a
    page makes ffcv's writer process die, and its parent then waits forever."""
    if max_resolution:
        max_pixels = min(max_pixels, max_resolution * max_resolution)
    need = 3 * max_pixels + (1 << 16)  # raw bytes; a JPEG of it is smaller; margin for the allocator
    page = 1 << 23
    while page < need:
        page <<= 1
    if page >= 1 << 32:
        raise ConversionError(f"an image of {max_pixels} pixels does not fit an ffcv page; pass --max-resolution")
    return page


# ---------------------------------------------------------------- writing

class _Samples:
    """Indexable dataset handed to ffcv's DatasetWriter: sample i -> (HxWx3 uint8 RGB, label, i).

    The writer's worker processes die silently on an exception and its parent then waits forever, so a file
    that fails at write time (it passed verification, so it changed since) is replaced by a black placeholder
    and its path appended to `error_log`; convert() fails the run afterwards.
    """

    def __init__(self, labels: np.ndarray, paths: list[str] | None, images: np.ndarray | None, error_log: str):
        self.labels, self.paths, self.images, self.error_log = labels, paths, images, error_log

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        # 'proportion' mode draws np.random in the worker: seed per sample so a re-run writes the same file.
        np.random.seed(i % (2**32))
        if self.images is not None:
            img = self.images[i]
        else:
            img = self._read(i)
        return img, int(self.labels[i]), int(i)

    def _read(self, i: int) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except Exception as e:  # noqa: BLE001
            with open(self.error_log, "a") as f:
                f.write(f"{self.paths[i]}\t{type(e).__name__}: {e}\n")
            return np.zeros((8, 8, 3), np.uint8)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _atomic_write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def convert(src: str, out: str, *, split: str = "train", max_resolution: int | None = None,
            jpeg_quality: int = 90, compress_probability: float = 0.5, write_mode: str = "proportion",
            smart_threshold: int | None = None, workers: int = 0, overwrite: bool = False, strict: bool = False,
            max_samples: int = 0, chunk_size: int = 100, progress: bool = True) -> dict:
    """Convert `src` into the .beton `out`; returns the manifest dict (also written to `out + '.json'`).

    write_mode: jpg (always JPEG at jpeg_quality) | raw (uint8 pixels) | smart (raw unless the raw image is
    larger than smart_threshold bytes; ffcv's rule) | proportion (JPEG with probability compress_probability).
    max_resolution: longest side after an INTER_AREA downscale (None/0: keep). workers: 0 = all cores.
    """
    t0 = time.time()
    if write_mode not in WRITE_MODES:
        raise ConversionError(f"--write-mode must be one of {WRITE_MODES}, got {write_mode!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ConversionError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    if not 0.0 <= compress_probability <= 1.0:
        raise ConversionError(f"--compress-probability must be in [0,1], got {compress_probability}")
    # bad-input fix (tests/test_bad_input.py): a negative --max-resolution made ffcv's writer processes fail
    # and the conversion hang forever; the other values were silently reinterpreted
    for name, value, low in (("--max-resolution", max_resolution or 0, 0), ("--chunk-size", chunk_size, 1),
                             ("--max-samples", max_samples, 0), ("--workers", workers, 0),
                             ("--smart-threshold", smart_threshold or 0, 0)):
        if value < low:
            raise ConversionError(f"{name} must be >= {low}, got {value}")
    out = os.path.abspath(out)
    manifest_path = out + ".json"
    if os.path.exists(out) and not overwrite:
        raise ConversionError(f"{out} exists; pass --overwrite to replace it")
    out_dir = os.path.dirname(out)
    if not os.path.isdir(out_dir):
        raise ConversionError(f"--out {out}: directory {out_dir} does not exist")
    workers = workers if workers > 0 else (os.cpu_count() or 1)

    source = _load_source(src, split, max_samples)
    skipped: list[dict] = []
    modes: dict[str, int] = {"RGB": len(source.labels)} if source.images is not None else {}
    max_pixels = int(np.prod(source.images.shape[1:3])) if source.images is not None else 0
    if source.paths is not None:
        good, skipped, modes, max_pixels = _verify_all(source.paths, workers, strict, progress)
        source.paths = [source.paths[p] for p in good]
        source.labels = source.labels[good]
    n = len(source.labels)
    if n == 0:
        raise ConversionError(f"--src {src}: every file was unreadable ({len(skipped)} skipped); nothing written")

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    tmp = os.path.join(out_dir, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    error_log = tmp + ".errors"
    try:
        fields = {
            "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution or None,
                                   smart_threshold=smart_threshold, jpeg_quality=jpeg_quality,
                                   compress_probability=compress_probability),
            "label": IntField(),
            "index": IntField(),
        }
        writer = DatasetWriter(tmp, fields, page_size=_page_size(max_pixels, max_resolution),
                               num_workers=min(workers, max(1, n // chunk_size + 1)))
        if not progress:  # ffcv's writer prints its own tqdm bar; silence it by routing to devnull
            with open(os.devnull, "w") as devnull:
                _stderr, sys.stderr = sys.stderr, devnull
                try:
                    writer.from_indexed_dataset(_Samples(source.labels, source.paths, source.images, error_log),
                                                chunksize=chunk_size)
                finally:
                    sys.stderr = _stderr
        else:
            writer.from_indexed_dataset(_Samples(source.labels, source.paths, source.images, error_log),
                                        chunksize=chunk_size)
        if os.path.exists(error_log) and os.path.getsize(error_log) > 0:
            with open(error_log) as f:
                bad = f.read().strip()
            raise ConversionError(f"files changed between verification and writing; nothing written:\n{bad}")
        sha = _sha256(tmp)
        size = os.path.getsize(tmp)
        os.replace(tmp, out)
    finally:
        for p in (tmp, error_log):
            if os.path.exists(p):
                os.remove(p)

    labelled = source.labels[source.labels >= 0]
    manifest = {
        "format": "fastcl-beton-manifest/1",
        "out": out,
        "source": {"path": os.path.abspath(src), "kind": source.kind,
                   "split": split if source.kind == "cifar10-batches" else None},
        "fields": {
            "image": "RGBImageField (RGB uint8; grayscale/CMYK/palette/RGBA converted to RGB)",
            "label": "IntField: position in `classes`; -1 = unlabelled",
            "index": "IntField: global sample id 0..N-1 = row = position in scan_folder order after removing "
                     "skipped files (pickle order for CIFAR-10 batches)",
        },
        "num_samples": n,
        "num_scanned": n + len(skipped),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "classes": source.classes,
        "class_counts": np.bincount(labelled, minlength=len(source.classes)).tolist() if source.classes else [],
        "source_modes": modes,
        "options": {"write_mode": write_mode, "max_resolution": max_resolution or None,
                    "jpeg_quality": jpeg_quality, "compress_probability": compress_probability,
                    "smart_threshold": smart_threshold, "workers": workers, "chunk_size": chunk_size,
                    "max_samples": max_samples, "strict": strict},
        "versions": {"fastcl": _version("fastcl"), "ffcv": _version("ffcv"), "pillow": _version("pillow"),
                     "numpy": np.__version__},
        "bytes": size,
        "sha256": sha,
        "duration_s": round(time.time() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _atomic_write_json(manifest_path, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="image folder (class sub-folders or flat) or CIFAR-10 batches dir")
    p.add_argument("--out", required=True, help="output .beton path (manifest goes to OUT.json)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="CIFAR-10 batches dir only")
    p.add_argument("--max-resolution", type=int, default=0, help="longest side after downscale; 0 = keep")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-probability", type=float, default=0.5, help="write-mode proportion only")
    p.add_argument("--write-mode", default="proportion", choices=WRITE_MODES)
    p.add_argument("--smart-threshold", type=int, default=None,
                   help="write-mode smart: JPEG when the raw image exceeds this many bytes (default: always raw)")
    p.add_argument("--workers", type=int, default=0, help="processes for verification and encoding; 0 = all cores")
    p.add_argument("--chunk-size", type=int, default=100)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable file instead of skipping")
    p.add_argument("--max-samples", type=int, default=0, help=">0: only the first N samples in id order")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        m = convert(a.src, a.out, split=a.split, max_resolution=a.max_resolution or None,
                    jpeg_quality=a.jpeg_quality, compress_probability=a.compress_probability,
                    write_mode=a.write_mode, smart_threshold=a.smart_threshold, workers=a.workers,
                    overwrite=a.overwrite, strict=a.strict, max_samples=a.max_samples, chunk_size=a.chunk_size,
                    progress=not a.no_progress)
    except ConversionError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['out']}: {m['num_samples']} samples, {m['num_skipped']} skipped, {m['bytes'] / 2**20:.1f} MiB, "
          f"{m['duration_s']:.1f} s; manifest {m['out']}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
