"""`torch` backend: image folders through a torch DataLoader, the portable fallback.

Workers (processes): PIL decode -> per view `rrc_box` (= `rrc_params` for one image) + PIL box resize
(bilinear, antialiased) + flip -> uint8 [3,S,S]. Main process: the batch goes to the device, where
`augment.device_stage` does colour jitter, grayscale, blur, solarize and normalization as batched tensor ops.

Reproducibility: every random draw comes from a generator seeded by `seed_for(...)` of the run seed, the
epoch, and the sample id + view (worker side) or the rank + local batch number (device side), so a run gives
the same batches whatever the number of workers, and a resumed run continues with the same batches.

`ShardBatchSampler` (sharding, epochs, mid-epoch resume) is shared with the gpu_tensor and synthetic backends.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fastcl.pipelines.augment import as_view_spec, device_stage, rrc_box
from fastcl.rand import seed_for
from fastcl.pipelines.augspec import ViewSpec
from fastcl.pipelines.batch import Batch, register, shard_indices
from fastcl.pipelines.folder import cfg_classes, load_rgb, scan_folder, split_path

DEVICE_STREAM = 0xD5  # salt separating the device-stage seeds from the worker-side ones


class ShardBatchSampler:
    """This rank's batches of global ids for the current epoch (`shard_indices` order), with mid-epoch resume.

    Iterating yields lists of (id, epoch) pairs: the epoch travels with each index because persistent
    DataLoader workers hold a stale copy of everything else. `skip` batches are left out of the NEXT
    iteration only (set by the owning loader's load_state_dict; nothing skipped is ever decoded).
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world: int, seed: int,
                 shuffle: bool = True, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"per-rank batch size must be >= 1, got {batch_size} (global batch // world)")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.num_samples, self.batch_size, self.rank, self.world = num_samples, batch_size, rank, world
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        # a pending resume skip belongs to its own epoch: keep it when the trainer re-announces that epoch
        if epoch != self.epoch:
            self.epoch, self.skip = epoch, 0

    def ids(self) -> Tensor:
        """[n_local] int64 ids of this rank for the current epoch."""
        return shard_indices(self.num_samples, self.batch_size, self.rank, self.world, self.seed, self.epoch,
                             self.shuffle, self.drop_last)

    def __len__(self) -> int:
        gb = self.batch_size * self.world
        n_full = self.num_samples // gb
        tail = self.num_samples - n_full * gb
        if self.drop_last or tail == 0:
            return n_full
        mine = tail // self.world + (1 if self.rank < tail % self.world else 0)  # tensor_split sizes
        return n_full + (1 if mine else 0)

    def take_batches(self) -> tuple[int, list[Tensor]]:
        """(first batch number, remaining id batches) for one pass; consumes the pending skip."""
        start, self.skip = self.skip, 0
        return start, list(self.ids().split(self.batch_size))[start:]

    def __iter__(self):
        # eager: DataLoader calls iter() when its own iterator is created, so the skip is read exactly then
        _, batches = self.take_batches()
        return iter([[(i, self.epoch) for i in b.tolist()] for b in batches])


class ShardedLoader:
    """Length, epoch and mid-epoch-resume plumbing shared by the loaders that own a `ShardBatchSampler`
    (`self.sampler`) and count the batches they have yielded this epoch in `self.batches_done`.

    A checkpoint taken after the trainer finished the step of the k-th batch of an epoch stores
    {"epoch": e, "batches_done": k}; loading it makes the next pass over epoch e start at batch k, with the
    same ids and pixels as the uninterrupted run (all seeds depend on (seed, epoch, id / batch number)).
    """

    sampler: ShardBatchSampler
    seed: int
    rank: int
    batches_done: int = 0

    def _shard_setup(self, num_samples: int, labels: Tensor, views: list, mean, std, batch_size: int, rank: int,
                     world: int, device, seed: int, shuffle: bool, drop_last: bool) -> None:
        """The state every backend shares: views, normalisation, device, the label table and the sampler."""
        self.views = [as_view_spec(v) for v in views]
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.device, self.rank, self.seed = torch.device(device), rank, seed
        self.num_samples = num_samples
        self.labels = labels  # [N] int64 by id: diagnostics / the oracle only, never training
        self.sampler = ShardBatchSampler(num_samples, batch_size, rank, world, seed, shuffle, drop_last)
        self.batches_done = 0

    def __len__(self) -> int:
        return len(self.sampler)  # batches per epoch on this rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.sampler.epoch:
            self.batches_done = 0
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        """The next __iter__ continues epoch `state['epoch']` after its first `batches_done` batches."""
        self.sampler.epoch = int(state["epoch"])
        self.sampler.skip = self.batches_done = int(state["batches_done"])

    key_partners: Tensor | None = None  # SePP pair mode: [N, k] partner ids (-1 padded)
    key_rho: float = 0.0

    def set_key_partners(self, nbr: Tensor, rho: float) -> None:
        """From now on view 0 of sample i comes from a semantic partner of i with probability rho."""
        self.key_partners, self.key_rho = nbr.cpu().long(), float(rho)

    def key_source(self, ids: Tensor) -> Tensor:
        """Source ids [B] of the key view (view 0) for the ids [B] of a batch of the current epoch."""
        if self.key_partners is None:
            return ids
        from fastcl.pipelines.pairs import partner_sources
        return partner_sources(ids.cpu(), self.key_partners, self.key_rho, self.seed, self.sampler.epoch)

    def batch_generator(self, k: int) -> torch.Generator:
        """CPU generator of the device-side draws of local batch k of the current epoch."""
        return torch.Generator().manual_seed(seed_for(self.seed, self.sampler.epoch, self.rank, k, DEVICE_STREAM))


class FolderViews(Dataset):
    """Item (id, epoch) -> (tuple of uint8 [3,S,S] views, id, label)."""

    def __init__(self, paths: list[str], labels: list[int], views: list[ViewSpec], seed: int):
        self.paths, self.labels, self.views, self.seed = paths, labels, views, seed
        self.key_partners, self.key_rho = None, 0.0  # set before the workers start (SePP pair mode)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        i, epoch = key
        im = load_rgb(self.paths[i])
        src = i
        if self.key_partners is not None:
            from fastcl.pipelines.pairs import partner_sources
            src = int(partner_sources(torch.tensor([i]), self.key_partners, self.key_rho, self.seed, epoch)[0])
        out = []
        for v, spec in enumerate(self.views):
            img = load_rgb(self.paths[src]) if (v == 0 and src != i) else im
            H, W = img.height, img.width
            g = torch.Generator().manual_seed(seed_for(self.seed, epoch, i, v))
            y0, x0, h, w = rrc_box(H, W, spec, g)
            crop = img.resize((spec.size, spec.size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
            if torch.rand(1, generator=g).item() < spec.flip_p:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1))
        return tuple(out), i, self.labels[i]


class TorchFolderLoader(ShardedLoader):
    """Loader protocol over an image folder (see module docstring)."""

    def __init__(self, path: str, views: list, mean, std, batch_size: int, rank: int = 0, world: int = 1,
                 device="cpu", seed: int = 0, workers: int = 2, shuffle: bool = True, drop_last: bool = True,
                 max_samples: int = 0, classes: list[str] | None = None):
        index = scan_folder(path, max_samples, classes)  # classes: data.classes subset (folder.py)
        self._shard_setup(len(index), torch.tensor(index.labels, dtype=torch.int64), views, mean, std, batch_size,
                          rank, world, device, seed, shuffle, drop_last)
        self.classes = index.classes
        self._dl = DataLoader(FolderViews(index.paths, index.labels, self.views, seed), batch_sampler=self.sampler,
                              num_workers=workers, persistent_workers=workers > 0,
                              pin_memory=self.device.type == "cuda")

    def set_key_partners(self, nbr: Tensor, rho: float) -> None:
        super().set_key_partners(nbr, rho)
        ds = self._dl.dataset  # persistent workers copy the dataset when they start: call before iterating
        ds.key_partners, ds.key_rho = self.key_partners, self.key_rho

    def __iter__(self):
        start = self.sampler.skip
        self.batches_done = start
        dev = self.device
        for k, (views, ids, labels) in enumerate(self._dl, start=start):
            self.batches_done = k + 1
            g = self.batch_generator(k)
            out = tuple(device_stage(v.to(dev, non_blocking=True), spec, self.mean, self.std, g)
                        for v, spec in zip(views, self.views))
            yield Batch(out, ids.to(dev, non_blocking=True), labels.to(dev, non_blocking=True))


@register("torch")
def build(cfg, rank: int = 0, world: int = 1, device="cpu", split: str = "train") -> TorchFolderLoader:
    d = cfg.data
    return TorchFolderLoader(split_path(cfg, split), list(d.aug.views), d.aug.mean, d.aug.std,
                             cfg.optim.batch_size // world, rank, world, device, cfg.trainer.seed, d.workers,
                             d.shuffle, d.drop_last, d.max_samples, cfg_classes(cfg))
