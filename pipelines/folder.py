"""Image folders: the sample order every folder-based backend shares, plus the PIL helpers they decode with.

Layouts (`scan_folder`):
- class folders: `root/<class>/**/<image>`; classes are the sorted names of the non-hidden sub-folders
  (label = position, 0..C-1; a class folder may be empty, it still gets its label so that train and test
  splits with the same class folders agree);
- flat: `root/<image>` with no sub-folders; every label is -1.
Order (the GLOBAL sample id is the position in it): classes sorted, then files sorted by their path relative
to the class folder. `max_samples > 0` keeps a prefix of that order, so on a class-sorted folder it keeps the
first classes only: make a balanced subset folder when a balanced subset is wanted.

Class subsets (`classes=`, from `data.classes`: a list of class folder names or a text file of them, one per
line, `#` comments and blank lines ignored; e.g. configs/data/imagenet100_classes.txt): only those class folders
are scanned, and they are numbered in SORTED name order (0..C-1), whatever the order of the list. So a class list
gives exactly the ids and labels of a folder that holds only those class folders (what a hand-made symlink
tree of ImageNet-100 gives torchvision's ImageFolder). A name that is not a class folder fails, naming it.

Several roots (`root` = folders joined with os.pathsep, e.g. `stl10/train:stl10/unlabeled`): one id space, the
roots' samples concatenated in the order given. Every class-folder root must have the same class folders (after
the class filter); flat roots are unlabelled (-1) and take no class filter. STL-10's train + unlabelled split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class FolderIndex:
    paths: list[str]  # absolute file paths; position = global sample id
    labels: list[int]  # class index per path, -1 for a flat folder
    classes: list[str] = field(default_factory=list)  # sorted class folder names ([] for a flat folder)

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_under(folder: str) -> list[str]:
    """All image files below `folder` (recursive), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if _is_image(f)]
    return sorted(found, key=lambda p: os.path.relpath(p, folder))


def read_class_list(spec) -> list[str] | None:
    """`data.classes` -> the class folder names, or None for "every class".

    spec: None / "" / [] (all classes), a list of names, or the path of a text file with one name per line
    (`#` starts a comment; blank lines are ignored). A relative path is tried against the working directory,
    then the repository root (so `configs/data/imagenet100_classes.txt` works from anywhere in a checkout).
    Duplicate or empty names fail, naming them.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, str):
        path = os.path.expanduser(spec)
        if not os.path.isabs(path) and not os.path.isfile(path):
            repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            if os.path.isfile(os.path.join(repo, path)):
                path = os.path.join(repo, path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.classes: class list file not found: {spec}")
        with open(path) as f:
            names = [line.split("#", 1)[0].strip() for line in f]
        names = [n for n in names if n]
        where = path
    else:
        names = [str(n).strip() for n in spec]
        where = "data.classes"
    if not names:
        if isinstance(spec, str):  # a file that lists nothing is a mistake, not "every class"
            raise ValueError(f"{where}: the class list is empty")
        return None
    if any(not n for n in names):
        raise ValueError(f"{where}: empty class name in the list")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: class {dup[0]!r} is listed more than once")
    return names


def cfg_classes(cfg) -> list[str] | None:
    """The class subset `data.classes` of a config (None: all classes)."""
    return read_class_list(cfg.data.get("classes", None))


def select_classes(available: list[str], wanted: list[str] | None, root: str) -> list[str]:
    """The class folders to scan: all of `available`, or `wanted` in sorted order after checking that each is
    a class folder of `root` (ValueError naming the first unknown ones)."""
    if wanted is None:
        return list(available)
    have = set(available)
    missing = [c for c in wanted if c not in have]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"data.classes: class {', '.join(repr(c) for c in missing[:3])}{more} is not a class "
                         f"folder of {root} ({len(available)} class folders there)")
    return sorted(wanted)


def scan_folder(root: str, max_samples: int = 0, classes: list[str] | None = None) -> FolderIndex:
    """Index an image folder (class sub-folders or flat) in the documented deterministic order.

    classes: a class subset (see the module docstring; `read_class_list` output), None = every class folder.
    root: one folder, or several joined with os.pathsep (one id space, concatenated in order).
    Raises FileNotFoundError when `root` does not exist, ValueError when it holds no image or mixes
    top-level images with class folders (the labels of the top-level images would be ambiguous), or when a
    listed class is not one of its class folders.
    """
    roots = [r for r in str(root).split(os.pathsep) if r]
    if len(roots) > 1:
        return _scan_roots(roots, max_samples, classes)
    index = _scan_one(root, classes)
    if max_samples > 0:
        index.paths, index.labels = index.paths[:max_samples], index.labels[:max_samples]
    return index


def _scan_roots(roots: list[str], max_samples: int, classes: list[str] | None) -> FolderIndex:
    parts = [_scan_one(r, classes, allow_flat_with_classes=True) for r in roots]
    labelled = [(r, p) for r, p in zip(roots, parts) if p.classes]
    if classes is not None and not labelled:
        raise ValueError(f"data.classes: none of the folders {roots} has class sub-folders")
    for r, p in labelled[1:]:
        if p.classes != labelled[0][1].classes:
            raise ValueError(f"{r}: class folders {p.classes[:3]}... differ from those of {labelled[0][0]} "
                             f"({labelled[0][1].classes[:3]}...); the labelled roots of one id space must agree")
    paths = [x for p in parts for x in p.paths]
    labels = [x for p in parts for x in p.labels]
    if max_samples > 0:
        paths, labels = paths[:max_samples], labels[:max_samples]
    return FolderIndex(paths, labels, list(labelled[0][1].classes) if labelled else [])


def _scan_one(root: str, wanted: list[str] | None, allow_flat_with_classes: bool = False) -> FolderIndex:
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    top_images = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(root, e))]
    if classes and top_images:
        raise ValueError(f"{root}: holds both images ({top_images[0]}, ...) and sub-folders ({classes[0]}, ...); "
                         "use one sub-folder per class, or a flat folder of images")
    if wanted is not None and not classes and not allow_flat_with_classes:
        raise ValueError(f"data.classes: {root} has no class sub-folders to select from (a flat folder)")
    if classes:
        classes = select_classes(classes, wanted, root)
        paths, labels = [], []
        for label, c in enumerate(classes):
            files = _images_under(os.path.join(root, c))
            paths += files
            labels += [label] * len(files)
    else:
        paths = [os.path.join(root, f) for f in top_images]
        labels = [-1] * len(paths)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
    return FolderIndex(paths, labels, classes)


def split_path(cfg, split: str) -> str:
    """The folder of a split: train -> data.path, eval -> data.eval_path, eval_train -> data.eval_train_path
    (falling back to data.path)."""
    d = cfg.data
    paths = {"train": d.path, "eval": d.eval_path, "eval_train": d.eval_train_path or d.path}
    if split not in paths:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(paths)}")
    if not paths[split]:
        raise ValueError(f"split {split!r} has no folder configured (data.path / data.eval_path)")
    return paths[split]


def load_rgb(path: str) -> Image.Image:
    """Decode one image as 3-channel RGB (grayscale, palette, CMYK and alpha images are converted)."""
    with Image.open(path) as im:
        return im.convert("RGB")  # convert() loads the pixels, so the file can be closed here


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    with Image.open(path) as im:
        w, h = im.size
    return h, w


def resize_center_crop(im: Image.Image, resize_to: int, crop: int) -> Image.Image:
    """Resize the shorter side to `resize_to` (bilinear, antialiased), then center-crop `crop` x `crop`
    (torchvision Resize + CenterCrop rounding)."""
    w, h = im.size
    if min(w, h) != resize_to:
        if w <= h:
            nw, nh = resize_to, int(resize_to * h / w)
        else:
            nw, nh = int(resize_to * w / h), resize_to
        im = im.resize((nw, nh), Image.BILINEAR)
    w, h = im.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return im.crop((left, top, left + crop, top + crop))


def decode_uint8(paths: list[str], transform, size_hw: tuple[int, int], workers: int = 2) -> torch.Tensor:
    """Decode `paths` with `transform(PIL RGB image) -> PIL image of size_hw` on a thread pool (PIL releases
    the GIL while decoding and resizing) into one uint8 tensor [N,3,H,W] on the CPU."""
    h, w = size_hw
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)

    def work(i: int) -> None:
        im = transform(load_rgb(paths[i]))
        if im.size != (w, h):
            raise ValueError(f"{paths[i]}: transformed to {im.size[1]}x{im.size[0]}, expected {h}x{w}")
        out[i] = np.asarray(im)

    with ThreadPool(max(1, workers)) as pool:
        pool.map(work, range(len(paths)), chunksize=64)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
