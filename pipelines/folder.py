"""Image folders: the sample order every folder-based backend shares, plus the PIL helpers they decode with.

Layouts (`scan_folder`):
- class folders: `root/<class>/**/<image>`; classes are the sorted names of the non-hidden sub-folders
  (label = position, 0..C-1; a class folder may be empty, it still gets its label so that train and test
  splits with the same class folders agree);
- flat: `root/<image>` with no sub-folders; every label is -1.
Order (the GLOBAL sample id is the position in it): classes sorted, then files sorted by their path relative
to the class folder. `max_samples > 0` keeps a prefix of that order, so on a class-sorted folder it keeps the
first classes only: make a balanced subset folder when a balanced subset is wanted.
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


def scan_folder(root: str, max_samples: int = 0) -> FolderIndex:
    """Index an image folder (class sub-folders or flat) in the documented deterministic order.

    Raises FileNotFoundError when `root` does not exist, ValueError when it holds no image or mixes
    top-level images with class folders (the labels of the top-level images would be ambiguous).
    """
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    top_images = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(root, e))]
    if classes and top_images:
        raise ValueError(f"{root}: holds both images ({top_images[0]}, ...) and sub-folders ({classes[0]}, ...); "
                         "use one sub-folder per class, or a flat folder of images")
    if classes:
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
    if max_samples > 0:
        paths, labels = paths[:max_samples], labels[:max_samples]
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
