"""Un-augmented evaluation data (kNN monitor, linear probe, SePP's embedding pass), streamed in batches: no
caller holds a whole decoded split (ImageNet-100 at 224 px would be about 76 GB of float32).

Eval transform: resize the shorter side to round(eval_size / eval_resize_ratio) (bilinear, antialiased), center
crop eval_size x eval_size, normalize with the AugSpec mean/std. Ids are the `scan_folder` positions, so they
match the training loaders' ids when the same folder (and the same `classes` subset, `data.classes`) is used.
"""
from __future__ import annotations

from multiprocessing.pool import ThreadPool
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from fastcl.pipelines.augment import normalize
from fastcl.pipelines.folder import load_rgb, resize_center_crop, scan_folder


def _eval_transform(aug):
    size = int(aug.eval_size)
    resize_to = int(round(size / float(aug.eval_resize_ratio)))
    return size, lambda im: resize_center_crop(im, resize_to, size)


def _finish(x_uint8: Tensor, aug) -> Tensor:
    """uint8 [B,3,S,S] -> normalized float [B,3,S,S]."""
    return normalize(x_uint8.float().div_(255.0), aug.mean, aug.std)


def eval_batches(path: str, aug, batch_size: int, rank: int = 0, world: int = 1, workers: int = 2,
                 max_samples: int = 0, classes: list[str] | None = None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Stream this rank's contiguous shard (ids `arange(N).tensor_split(world)[rank]`) in order.

    Yields (x float [B,3,S,S] normalized on the CPU, labels [B] int64, ids [B] int64); decoding runs on a
    thread pool one batch ahead of the consumer.
    """
    index = scan_folder(path, max_samples, classes)
    size, tf = _eval_transform(aug)
    ids = torch.arange(len(index), dtype=torch.int64).tensor_split(world)[rank]
    labels = torch.tensor(index.labels, dtype=torch.int64)

    def decode(i: int) -> np.ndarray:
        return np.asarray(tf(load_rgb(index.paths[i])))

    chunks = ids.split(batch_size)
    with ThreadPool(max(1, workers)) as pool:
        # one batch decodes while the consumer works on the previous one (bounded memory, order preserved)
        pending = pool.map_async(decode, chunks[0].tolist(), chunksize=16) if chunks else None
        for j, chunk in enumerate(chunks):
            arrays = pending.get()
            if j + 1 < len(chunks):
                pending = pool.map_async(decode, chunks[j + 1].tolist(), chunksize=16)
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
            yield _finish(x, aug), labels[chunk], chunk
