"""`synthetic` backend: generated images for compute-only benchmarks and tests (no files, no decoding).

Sample `id` (label `id % num_classes`) is a fixed image: 0.6 * a smooth colour pattern of its class (a random
4x4 colour grid per class, upsampled) + 0.4 * noise hashed from (id, 4x4-pixel cell), so a kNN monitor has
something to learn. A view adds a per-sample random brightness factor and horizontal flip. Everything is
generated per batch with a few elementwise torch ops directly on the device, so the loader costs next to nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl.pipelines.augment import normalize
from fastcl.device import host_to_device
from fastcl.rand import hash01, seed_for
from fastcl.pipelines.batch import Batch, register
from fastcl.pipelines.torch_loader import DEVICE_STREAM, ShardedLoader

class SyntheticLoader(ShardedLoader):
    """Loader protocol over generated images (see module docstring)."""

    def __init__(self, num_samples: int, num_classes: int, views: list, mean, std, batch_size: int,
                 rank: int = 0, world: int = 1, device="cpu", seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        self._shard_setup(num_samples, torch.arange(num_samples) % num_classes, views, mean, std, batch_size, rank,
                          world, device, seed, shuffle, drop_last)
        self.num_classes = num_classes
        g = torch.Generator().manual_seed(seed_for(seed, 0x5E7))
        self._grid = torch.rand(num_classes, 3, 4, 4, generator=g).to(self.device)  # class colour patterns
        self._patterns: dict[int, Tensor] = {}  # view size -> [C,3,S,S]

    def _pattern(self, size: int) -> Tensor:
        if size not in self._patterns:
            self._patterns[size] = F.interpolate(self._grid, size=(size, size), mode="bilinear", align_corners=False)
        return self._patterns[size]

    def images(self, ids: Tensor, size: int) -> Tensor:
        """The fixed (un-augmented) images of `ids` ([B] int64 on the device): float [B,3,size,size] in [0,1]."""
        r = max(1, size // 4)  # noise in 4x4-pixel cells: 16x fewer hashes, still a fixed image per id
        noise = hash01(ids, 3 * r * r, salt=size).view(-1, 3, r, r)
        noise = F.interpolate(noise, size=(size, size), mode="nearest")
        return 0.6 * self._pattern(size)[ids % self.num_classes] + 0.4 * noise

    def __iter__(self):
        start, batches = self.sampler.take_batches()
        self.batches_done = start
        dev, b, world = self.device, self.sampler.batch_size, self.sampler.world
        for k, ids in enumerate(batches, start=start):
            self.batches_done = k + 1
            # Draw the per-sample factors of the whole GLOBAL batch k from a rank-free seed and keep this
            # rank's slice: a sample then gets the same view whatever the number of processes, which is what
            # lets a 2-process run reproduce a 1-process run exactly (tests/test_train.py).
            g = torch.Generator().manual_seed(seed_for(self.seed, self.sampler.epoch, k, DEVICE_STREAM))
            mine = slice(self.rank * b, self.rank * b + len(ids))
            ids_dev = host_to_device(ids, dev)
            src = self.key_source(ids)
            src_dev = ids_dev if src is ids else host_to_device(src, dev)
            out = []
            for v, spec in enumerate(self.views):
                bright = 0.6 + 0.8 * torch.rand(b * world, generator=g)[mine]
                flips = (torch.rand(b * world, generator=g) < spec.flip_p)[mine]
                x = (self.images(src_dev if v == 0 else ids_dev, spec.size) * host_to_device(bright, dev).view(-1, 1, 1, 1)).clamp_(0, 1)
                x = torch.where(host_to_device(flips, dev)[:, None, None, None], x.flip(-1), x)
                out.append(normalize(x, self.mean, self.std))
            yield Batch(tuple(out), ids_dev, ids_dev % self.num_classes)


@register("synthetic")
def build(cfg, rank: int = 0, world: int = 1, device="cpu", split: str = "train") -> SyntheticLoader:
    """Every split is the same generated set (an eval split of synthetic data is only a smoke test)."""
    d = cfg.data
    return SyntheticLoader(d.num_samples, d.num_classes, list(d.aug.views), d.aug.mean, d.aug.std,
                           cfg.optim.batch_size // world, rank, world, device, cfg.trainer.seed, d.shuffle,
                           d.drop_last)
