"""`synthetic` backend: generated images for compute-only benchmarks and tests (no files, no decoding).

Sample `id` (label `id % num_classes`) is a fixed image: 0.6 * a smooth colour pattern of its class (a random
4x4 colour grid per class, upsampled) + 0.4 * noise hashed from (id, pixel), so a kNN monitor has something to
learn. A view adds a per-sample random brightness factor and horizontal flip. Everything is generated per batch
with a few elementwise torch ops directly on the device, so the loader costs next to nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl.pipelines.augment import as_view_spec, flip, host_to_device, normalize, seed_for
from fastcl.pipelines.batch import Batch, register
from fastcl.pipelines.torch_loader import DEVICE_STREAM, ShardBatchSampler

_M32 = 0xFFFFFFFF


def hash01(ids: Tensor, numel: int, salt: int = 0) -> Tensor:
    """Deterministic uniform [0,1) noise per (id, position): [B] int64 -> float [B, numel], on ids' device."""
    pos = torch.arange(numel, device=ids.device, dtype=torch.int64)
    x = (ids[:, None] * 0x9E3779B1 + pos[None] * 0x45D9F3B + salt) & _M32
    for mult in (0x7FEB352D, 0x6C8E9CF5):  # two multiply-xorshift rounds (lowbias32-style mixing)
        x = ((x ^ (x >> 16)) * mult) & _M32  # constants < 2^31 keep the int64 products exact
    x = x ^ (x >> 15)
    return x.float() * (1.0 / 2**32)


class SyntheticLoader:
    """Loader protocol over generated images (see module docstring)."""

    def __init__(self, num_samples: int, num_classes: int, views: list, mean, std, batch_size: int,
                 rank: int = 0, world: int = 1, device="cpu", seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        self.views = [as_view_spec(v) for v in views]
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.device, self.rank, self.seed = torch.device(device), rank, seed
        self.num_samples, self.num_classes = num_samples, num_classes
        self.labels = torch.arange(num_samples) % num_classes  # [N] by id, for diagnostics only
        g = torch.Generator().manual_seed(seed_for(seed, 0x5E7))
        self._grid = torch.rand(num_classes, 3, 4, 4, generator=g).to(self.device)  # class colour patterns
        self._patterns: dict[int, Tensor] = {}  # view size -> [C,3,S,S]
        self.sampler = ShardBatchSampler(num_samples, batch_size, rank, world, seed, shuffle, drop_last)
        self.batches_done = 0

    def _pattern(self, size: int) -> Tensor:
        if size not in self._patterns:
            self._patterns[size] = F.interpolate(self._grid, size=(size, size), mode="bilinear", align_corners=False)
        return self._patterns[size]

    def images(self, ids: Tensor, size: int) -> Tensor:
        """The fixed (un-augmented) images of `ids` ([B] int64 on the device): float [B,3,size,size] in [0,1]."""
        noise = hash01(ids, 3 * size * size, salt=size).view(-1, 3, size, size)
        return 0.6 * self._pattern(size)[ids % self.num_classes] + 0.4 * noise

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.sampler.epoch:
            self.batches_done = 0
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch = int(state["epoch"])
        self.sampler.skip = self.batches_done = int(state["batches_done"])

    def __iter__(self):
        start, batches = self.sampler.take_batches()
        self.batches_done = start
        epoch, dev = self.sampler.epoch, self.device
        for k, ids in enumerate(batches, start=start):
            self.batches_done = k + 1
            g = torch.Generator().manual_seed(seed_for(self.seed, epoch, self.rank, k, DEVICE_STREAM))
            ids_dev = host_to_device(ids, dev)
            out = []
            for spec in self.views:
                bright = host_to_device(0.6 + 0.8 * torch.rand(len(ids), generator=g), dev).view(-1, 1, 1, 1)
                x = flip((self.images(ids_dev, spec.size) * bright).clamp_(0, 1), spec.flip_p, g)
                out.append(normalize(x, self.mean, self.std))
            yield Batch(tuple(out), ids_dev, ids_dev % self.num_classes)


@register("synthetic")
def build(cfg, rank: int = 0, world: int = 1, device="cpu", split: str = "train") -> SyntheticLoader:
    """Every split is the same generated set (an eval split of synthetic data is only a smoke test)."""
    d = cfg.data
    return SyntheticLoader(d.num_samples, d.num_classes, list(d.aug.views), d.aug.mean, d.aug.std,
                           cfg.optim.batch_size // world, rank, world, device, cfg.trainer.seed, d.shuffle,
                           d.drop_last)
