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
a flat folder of images (unlabelled), several folders joined with ':' (one id space, in the order given), or an
array dataset (`pipelines/sources.py`): a CIFAR-10 python batches directory (data_batch_1..5 / test_batch), a
CIFAR-100 python directory (train / test / meta; fine labels), or an STL-10 binary directory (train_X.bin /
train_y.bin, test_*, unlabeled_X.bin; unlabelled images get label -1); `--split` picks train|test, and for
STL-10 also unlabeled|train+unlabeled.

    python pipelines/convert.py --src imagenet/train --classes configs/data/imagenet100_classes.txt --out in100.beton
    python pipelines/convert.py --src stl10_binary --split train+unlabeled --out stl10_train_unl.beton --write-mode raw

Class subsets: `--classes FILE` (one class folder name per line) keeps only those class folders, labelled 0..C-1
in sorted name order: the ids and labels the folder backends give the same folder with `data.classes`. The
manifest records the classes, and the ffcv backend refuses a .beton whose classes differ from `data.classes`.

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

from fastcl.pipelines import sources
from fastcl.pipelines.folder import read_class_list, scan_folder

WRITE_MODES = ("jpg", "raw", "smart", "proportion")


class ConversionError(RuntimeError):
    """A conversion that cannot proceed; the message names the offending file or option."""


@dataclass
class _Source:
    kind: str  # "folder" | "flat" | "cifar10-batches" | "cifar100-python" | "stl10-binary"
    labels: np.ndarray  # [N] int64, -1 = unlabelled
    classes: list[str]
    paths: list[str] | None = None  # image files (folder kinds)
    images: object = None  # [N,H,W,3] uint8, indexable (array kinds: see sources.py)
    extra: dict | None = None  # more manifest entries (CIFAR-100: the superclass of each class, diagnostics)


# ---------------------------------------------------------------- sources

def _load_source(src: str, split: str, max_samples: int, classes: list[str] | None = None) -> _Source:
    roots = [r for r in src.split(os.pathsep) if r]
    if not roots or not all(os.path.isdir(r) for r in roots):
        raise ConversionError(f"--src {src}: not a directory")
    kind = sources.detect(src) if len(roots) == 1 else None
    if kind is not None:
        try:
            arr = sources.load(src, split, max_samples)
        except sources.SourceError as e:
            raise ConversionError(str(e)) from e
        if classes is not None:
            raise ConversionError(f"--classes applies to image folders, not to a {kind} directory")
        extra = None
        if arr.coarse_labels is not None:
            extra = {"coarse_classes": arr.coarse_classes,
                     "coarse_of_class": sources.coarse_of_fine(arr.labels, arr.coarse_labels, len(arr.classes))}
        return _Source(kind, arr.labels, list(arr.classes), images=arr.images, extra=extra)
    try:
        idx = scan_folder(src, max_samples=max_samples, classes=classes)
    except (FileNotFoundError, ValueError) as e:  # empty folder, images mixed with class folders, unknown class
        raise ConversionError(f"--src {src}: {e}") from e
    labels = np.asarray(idx.labels, dtype=np.int64)
    return _Source("flat" if not idx.classes else "folder", labels, list(idx.classes), paths=list(idx.paths))


def check_beton_classes(beton: str, classes: list[str] | None) -> None:
    """ffcv backend + `data.classes`: the .beton must have been converted with exactly that class subset
    (`convert.py --classes FILE`), so that its ids and labels are the ones the folder backends give. Reads the
    manifest `BETON.json`; ValueError naming the difference otherwise. No-op when classes is None."""
    if classes is None:
        return
    man = beton + ".json"
    if not os.path.isfile(man):
        raise ValueError(f"data.classes is set but {man} (the manifest convert.py writes next to the .beton) is "
                         f"missing, so the .beton's classes cannot be checked; re-create it with "
                         f"`python pipelines/convert.py --src <train folder> --classes <class file> --out {beton}`")
    with open(man) as f:
        have = json.load(f).get("classes", [])
    want = sorted(classes)
    if have != want:
        extra = [c for c in have if c not in set(want)]
        lack = [c for c in want if c not in set(have)]
        diff = (f"class {lack[0]!r} is not in it" if lack else f"it also holds class {extra[0]!r}" if extra
                else "its class order differs")
        raise ValueError(f"data.classes lists {len(want)} classes but {beton} holds {len(have)}: {diff}; convert "
                         f"it with the same list: `python pipelines/convert.py --src <train folder> --classes "
                         f"<class file> --out {beton}`")


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
            max_samples: int = 0, chunk_size: int = 100, progress: bool = True,
            classes: list[str] | str | None = None) -> dict:
    """Convert `src` into the .beton `out`; returns the manifest dict (also written to `out + '.json'`).

    write_mode: jpg (always JPEG at jpeg_quality) | raw (uint8 pixels) | smart (raw unless the raw image is
    larger than smart_threshold bytes; ffcv's rule) | proportion (JPEG with probability compress_probability).
    max_resolution: longest side after an INTER_AREA downscale (None/0: keep). workers: 0 = all cores.
    classes: a class subset of an image folder (list, or a class-list file; `folder.read_class_list`): only
    those class folders are written, labels 0..C-1 in sorted name order (= the folder backends' ids with the
    same `data.classes`).
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

    try:
        class_list = read_class_list(classes)
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(f"--classes: {e}") from e
    source = _load_source(src, split, max_samples, class_list)
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
        "source": {"path": os.pathsep.join(os.path.abspath(r) for r in src.split(os.pathsep) if r),
                   "kind": source.kind, "split": split if source.images is not None else None,
                   "class_subset": class_list is not None},
        "fields": {
            "image": "RGBImageField (RGB uint8; grayscale/CMYK/palette/RGBA converted to RGB)",
            "label": "IntField: position in `classes`; -1 = unlabelled",
            "index": "IntField: global sample id 0..N-1 = row = position in scan_folder order after removing "
                     "skipped files (pickle order for CIFAR batches; (label, position) then unlabelled for STL-10)",
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
    manifest.update(source.extra or {})
    _atomic_write_json(manifest_path, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="image folder (class sub-folders or flat; several joined with ':' "
                   "= one id space), CIFAR-10/CIFAR-100 python dir or STL-10 binary dir")
    p.add_argument("--out", required=True, help="output .beton path (manifest goes to OUT.json)")
    p.add_argument("--split", default="train", choices=["train", "test", "unlabeled", "train+unlabeled"],
                   help="array sources only: train|test (CIFAR), train|test|unlabeled|train+unlabeled (STL-10)")
    p.add_argument("--classes", default=None, help="class-list file (one class folder name per line): convert "
                   "only those classes of an image folder (data.classes of the training config)")
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
                    progress=not a.no_progress, classes=a.classes)
    except ConversionError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['out']}: {m['num_samples']} samples, {m['num_skipped']} skipped, {m['bytes'] / 2**20:.1f} MiB, "
          f"{m['duration_s']:.1f} s; manifest {m['out']}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
