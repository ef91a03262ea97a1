"""The data contract every backend implements (DESIGN.md "Data contract").

A backend yields `Batch`es whose `index` holds GLOBAL dataset ids (0..N-1), never batch positions: the
queue, the SampleTable, IFND's pseudo-labels and SePP's partner table are all keyed by them.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Protocol

import torch
from torch import Tensor


class Batch(NamedTuple):
    views: tuple[Tensor, ...]  # each [B,3,H,W] float, normalized, on the training device
    index: Tensor  # [B] int64 global dataset ids
    label: Tensor | None  # [B] int64; only eval/diagnostics may read it, never training code


class Loader(Protocol):
    num_samples: int  # N: sizes the SampleTable and the miners

    def __len__(self) -> int: ...  # batches per epoch on this rank

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int) -> None: ...  # same permutation seed on every rank


# name -> factory(cfg: fastcl.config.Config, rank: int, world: int, device: torch.device) -> Loader.
# Backends register themselves on import (see pipelines/__init__.py: imports are lazy so that
# a missing optional dependency (ffcv, dali) only fails when that backend is asked for).
LOADERS: dict[str, Callable[..., Loader]] = {}


def register(name: str):
    def deco(fn):
        LOADERS[name] = fn
        return fn

    return deco


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
    """The global sample order of one epoch, identical on every rank. [N] int64."""
    if not shuffle:
        return torch.arange(num_samples)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g)


def shard_indices(num_samples: int, batch_size: int, rank: int, world: int, seed: int, epoch: int,
                  shuffle: bool = True, drop_last: bool = True) -> Tensor:
    """This rank's ids for one epoch, ordered so that its k-th local batch is slice k of global batch k.

    `batch_size` is the PER-RANK batch. Global batch k = perm[k*B*W : (k+1)*B*W]; rank r takes the r-th
    contiguous block of it. With drop_last the incomplete final global batch is dropped (every rank then
    sees the same number of batches, so collectives stay matched); without it, the tail is split as evenly
    as possible with no padding, so each sample is still seen exactly once across ranks. [n_local] int64.
    """
    perm = epoch_permutation(num_samples, seed, epoch, shuffle)
    gb = batch_size * world
    n_full = num_samples // gb
    full = perm[: n_full * gb].view(n_full, world, batch_size)[:, rank].reshape(-1)
    if drop_last or n_full * gb == num_samples:
        return full
    tail = perm[n_full * gb:]
    return torch.cat([full, tail.tensor_split(world)[rank]])
