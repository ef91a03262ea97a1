"""Embedding passes over a whole dataset with the eval transform (IFND source=pass, SePP mining, probes)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import dist


def shard_ids(n: int, rank: int, world: int) -> Tensor:
    """The ids [n_r] int64 rank r embeds: the contiguous shard arange(n).tensor_split(world)[rank]."""
    return torch.arange(n, dtype=torch.int64).tensor_split(world)[rank]


def _is_beton(cfg, path: str | None) -> bool:
    return str(path or cfg.data.path).endswith(".beton")


def _source(cfg, loader, path: str | None, batch_size: int, rank: int, world: int, max_samples: int | None = None
            ) -> tuple[int, Iterator[tuple[Tensor, Tensor]]]:
    """(N, iterator of (x float [B,3,S,S] normalized, ids [B]) over this rank's shard) through the run's own
    backend where it has an eval path: ffcv (.beton, center-crop decode-once decoder), dali (a DALI graph),
    synthetic (its fixed images); otherwise the image folder through PIL (`eval_batches`). max_samples: the
    first ids kept (None: data.max_samples, the training set's; 0: every image of `path`)."""
    d = cfg.data
    limit = d.max_samples if max_samples is None else max_samples
    if d.backend == "synthetic" and path is None:
        from fastcl.pipelines.augment import normalize as norm_img

        n = loader.num_samples

        def synth():
            for ids in shard_ids(n, rank, world).split(batch_size):
                yield norm_img(loader.images(ids, d.aug.eval_size), d.aug.mean, d.aug.std), ids
        return n, synth()
    if _is_beton(cfg, path):
        from fastcl.pipelines.ffcv_loader import _rows_by_id, ffcv_eval_batches, read_beton_fields

        beton = path or d.path
        n = len(_rows_by_id(read_beton_fields(beton)[0], beton, limit))
        return n, ffcv_eval_batches(beton, d.aug, batch_size, rank, world, d.workers, limit)
    from fastcl.pipelines.folder import cfg_classes, scan_folder

    root = path or d.path
    classes = cfg_classes(cfg)  # data.classes: the training ids of a class subset
    n = len(scan_folder(root, limit, classes).paths)
    if d.backend == "dali" and path is None:
        from fastcl.pipelines.dali_loader import dali_eval_batches

        return n, dali_eval_batches(root, d.aug, batch_size, rank, world, d.workers, limit, classes=classes)
    from fastcl.pipelines.eval_data import eval_batches

    it = eval_batches(root, d.aug, batch_size, rank, world, workers=d.workers, max_samples=limit,
                      classes=classes)
    return n, ((x, ids) for x, _, ids in it)


def gather_by_id(feats: Tensor, ids: Tensor, n: int, world: int) -> Tensor:
    """Every rank's (feats [n_r, D], ids [n_r]) -> [n, D] on the CPU, row = id. Collective when world > 1 (the
    shards of `shard_ids` differ by at most one row: each is padded to ceil(n / world) for the all-gather)."""
    out = torch.zeros(n, feats.shape[1])
    if world == 1:
        out[ids.cpu()] = feats.cpu()
        return out
    m = -(-n // world)
    pad_f = torch.zeros(m, feats.shape[1], dtype=feats.dtype, device=feats.device)
    pad_i = torch.full((m,), -1, dtype=torch.int64, device=feats.device)
    pad_f[:len(ids)], pad_i[:len(ids)] = feats, ids.to(feats.device)
    all_f, all_i = dist.gather(pad_f).cpu(), dist.gather(pad_i).cpu()
    keep = all_i >= 0
    out[all_i[keep]] = all_f[keep]
    return out


@torch.no_grad()
def embed_dataset(net: nn.Module, cfg, loader=None, path: str | None = None, batch_size: int = 256,
                  normalize: bool = True, progress: bool = False, max_samples: int | None = None,
                  gather: bool = True):
    """Features [N, D] (CPU, row = global sample id) of every training image, un-augmented.

    Sharded over all ranks: with torch.distributed initialized this is a COLLECTIVE (every rank calls it); rank r
    embeds `shard_ids(N, r, W)` and the shards are all-gathered by id, so every rank returns the same full
    [N, D] (equal to the 1-process pass up to float rounding). Images come through the run's own backend
    (`_source`): the .beton for ffcv, a DALI graph for dali, the fixed images for synthetic, else the folder
    through PIL (`eval_batches`: resize + center crop, ids in scan_folder order = the training ids); `path`
    overrides the training data (a folder, or a .beton); `max_samples` overrides data.max_samples (0: all of it).
    `net` runs in eval mode (BN running statistics). Only the current batch and those the reader decodes ahead
    are held, never the whole split: host memory grows with batch_size, plus the [N, D] features.
    gather=False: no collective; returns this rank's shard (features [n_r, D] on the network's device, ids [n_r]).
    """
    device = next(net.parameters()).device
    rank, world = dist.rank(), dist.world_size()
    was_training = net.training
    net.eval()
    try:
        n, batches = _source(cfg, loader, path, batch_size, rank, world, max_samples)
        if n < world:
            raise ValueError(f"embed_dataset: {n} images cannot be sharded over {world} ranks")
        ids = shard_ids(n, rank, world)
        local_f = _embed_shard(net, batches, ids, normalize, device, progress, batch_size, rank)
    finally:
        net.train(was_training)
    if not gather:
        return local_f, ids
    return gather_by_id(local_f, ids, n, world)


def _embed_shard(net: nn.Module, batches, ids: Tensor, normalize: bool, device, progress: bool, batch_size: int,
                 rank: int) -> Tensor:
    """Features [n_r, D] (on `device`) of this rank's shard ids [n_r], from `batches` of (x [B,3,S,S], ids [B])
    that must come in shard order (RuntimeError otherwise).

    The rows are written into ONE buffer allocated at the first batch: no per-batch tensor outlives its batch.
    Small survivors between the freed image buffers would fragment glibc's heap (its mmap threshold rises to the
    batch size after the first free, so later batches come from the heap), and the peak RSS then crept up with
    the number of batches, not only with the batch size."""
    from tqdm import tqdm

    out, done = None, 0
    for x, i in tqdm(batches, total=-(-len(ids) // batch_size), disable=not progress, desc="embedding"):
        f = net(x.to(device)).float()
        f = F.normalize(f, dim=1) if normalize else f
        if out is None:
            out = torch.empty(len(ids), f.shape[1], dtype=f.dtype, device=f.device)
        if not torch.equal(i.to(torch.int64).cpu(), ids[done:done + len(i)]):
            raise RuntimeError(f"embed_dataset: rank {rank} got ids {i[:4].tolist()}... at row {done} of its shard, "
                               f"which holds ids {ids[0].item()}..{ids[-1].item()} in order")
        out[done:done + len(i)] = f
        done += len(i)
    if done != len(ids):
        raise RuntimeError(f"embed_dataset: rank {rank} embedded {done} ids, its shard holds {len(ids)}")
    return out
