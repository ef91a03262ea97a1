"""`gpu_tensor` backend: decode a small image folder ONCE into a uint8 tensor on the device, augment there.

The fastest path for CIFAR-size data: after the one-off decode (a thread pool; ~5k CIFAR JPEGs take a few
seconds, no cache file is written) a batch is a gather by id, then per view `rrc_params` (CPU draws) +
`crop_resize` (one batched grid_sample) + `flip` + `augment.device_stage`, all on the device.

Stored resolution: the native size when every image has the same size (CIFAR 32x32); otherwise each image is
resized (shorter side) to the largest view size and center-cropped to a square of that side, so crops are
taken from that square (the full-image RandomResizedCrop of the torch backend sees the whole frame instead).
Memory: N*3*H*W bytes (50k CIFAR = 150 MB; 13k Imagenette at 224 = 2 GB).
"""
from __future__ import annotations

import torch

from fastcl.pipelines.augment import crop_resize, device_stage, flip, rrc_params
from fastcl.device import host_to_device
from fastcl.pipelines.batch import Batch, register
from fastcl.pipelines.folder import cfg_classes, decode_uint8, image_size, resize_center_crop, scan_folder, split_path
from fastcl.pipelines.torch_loader import ShardedLoader


def decode_folder(paths: list[str], side_if_mixed: int, workers: int = 2) -> torch.Tensor:
    """uint8 [N,3,H,W] on the CPU: native size if all images share it, else side_if_mixed^2 squares."""
    sizes = {image_size(p) for p in paths}  # header reads only
    if len(sizes) == 1:
        hw = sizes.pop()
        return decode_uint8(paths, lambda im: im, hw, workers)
    return decode_uint8(paths, lambda im: resize_center_crop(im, side_if_mixed, side_if_mixed),
                        (side_if_mixed, side_if_mixed), workers)


class GPUTensorLoader(ShardedLoader):
    """Loader protocol over a folder held in device memory (see module docstring)."""

    def __init__(self, path: str, views: list, mean, std, batch_size: int, rank: int = 0, world: int = 1,
                 device="cpu", seed: int = 0, workers: int = 2, shuffle: bool = True, drop_last: bool = True,
                 max_samples: int = 0, classes: list[str] | None = None):
        index = scan_folder(path, max_samples, classes)  # classes: data.classes subset (folder.py)
        self._shard_setup(len(index), torch.tensor(index.labels, dtype=torch.int64), views, mean, std, batch_size,
                          rank, world, device, seed, shuffle, drop_last)
        self.classes = index.classes
        self.images = decode_folder(index.paths, max(v.size for v in self.views), workers).to(self.device)
        self._labels_dev = self.labels.to(self.device)

    def __iter__(self):
        start, batches = self.sampler.take_batches()
        self.batches_done = start
        dev = self.device
        _, _, H, W = self.images.shape
        for k, ids in enumerate(batches, start=start):
            self.batches_done = k + 1
            g = self.batch_generator(k)
            ids_dev = host_to_device(ids, dev)
            imgs = self.images.index_select(0, ids_dev)  # uint8 [B,3,H,W]
            src = self.key_source(ids)
            key_imgs = imgs if src is ids else self.images.index_select(0, host_to_device(src, dev))
            out = []
            for v, spec in enumerate(self.views):
                x = crop_resize(key_imgs if v == 0 else imgs, rrc_params(len(ids), torch.tensor(H), torch.tensor(W), spec, g), spec.size)
                x = flip(x, spec.flip_p, g)
                out.append(device_stage(x, spec, self.mean, self.std, g))
            yield Batch(tuple(out), ids_dev, self._labels_dev.index_select(0, ids_dev))


@register("gpu_tensor")
def build(cfg, rank: int = 0, world: int = 1, device="cpu", split: str = "train") -> GPUTensorLoader:
    d = cfg.data
    return GPUTensorLoader(split_path(cfg, split), list(d.aug.views), d.aug.mean, d.aug.std,
                           cfg.optim.batch_size // world, rank, world, device, cfg.trainer.seed, d.workers,
                           d.shuffle, d.drop_last, d.max_samples, cfg_classes(cfg))
