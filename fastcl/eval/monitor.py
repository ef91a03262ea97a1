"""The training run's kNN monitor: weighted kNN top-1 and effective rank of the backbone on a labelled held-out
split, every `trainer.knn_every` epochs (fastcl/train.py). Evaluation reads labels; training code never does.

Streamed, with bounded memory. The bank (`data.eval_train_path`, else the run's own training data `data.path`)
and the held-out split (`data.eval_path`) are embedded batch by batch by `fastcl.eval.features.embed_dataset`,
sharded over the ranks (rank r embeds ids `arange(N).tensor_split(W)[r]`) and all-gathered by id, so every rank
works and no rank decodes a whole split. Only the L2-normalised features ([N, D], [M, D]) and the labels are
kept, never the decoded images: host memory grows with the batch size (plus N * D floats for the features), not
with N * 3 * S * S (about 76 GB of float32 for ImageNet-100 at 224 px). The price: every evaluation decodes both
splits again.

Each split is read through `embed_dataset`'s source for an explicit path: an image folder through PIL (resize +
centre crop, the transform the held-out folder gets too), a .beton through ffcv's centre-crop decode, so a run
with `data.backend=ffcv data.path=X.beton` gets its bank from X.beton. The splits are read whole, whatever
`data.max_samples` (which limits the training set only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastcl import dist

EVAL_BATCH = 256  # images per embedding batch: the monitor's decoded-image memory is about 2 such batches
SIMS_BLOCK = 16 << 20  # elements of one [queries, N] similarity block of the kNN vote (64 MB of float32)


@dataclass
class Split:
    """A labelled split of the monitor: the config key naming it, its path (folder or .beton), labels [N] int64
    (row = global sample id; -1 for images of a flat folder)."""
    key: str
    path: str
    labels: Tensor


def split_labels(path: str, classes: list[str] | None) -> Tensor:
    """Labels [N] int64 by global sample id, without decoding an image: a .beton's `label` field (put in id
    order through its `index` field), or each image's class folder in `scan_folder` order (data.classes subset).
    Raises FileNotFoundError / ValueError for a missing or unusable split."""
    if path.endswith(".beton"):
        from fastcl.pipelines.ffcv_loader import _rows_by_id, read_beton_fields

        index, label = read_beton_fields(path)
        return torch.from_numpy(label[_rows_by_id(index, path, 0)])
    from fastcl.pipelines.folder import scan_folder

    return torch.tensor(scan_folder(path, classes=classes).labels, dtype=torch.int64)


def open_split(cfg, key: str) -> Split:
    """The split of config key `data.<key>` with its labels; a bad path raises ValueError naming the key. Every
    rank opens the splits (a cheap listing), so a bad path fails on all ranks alike, before training writes."""
    from fastcl.pipelines.folder import cfg_classes

    path = str(cfg.data[key])
    try:
        return Split(key, path, split_labels(path, cfg_classes(cfg)))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"data.{key}: {e}") from None


def voters(split: Split) -> Tensor | None:
    """Ids [n] of the bank's labelled images (label >= 0), which alone vote; None when every image is labelled.
    Unlabelled ones (STL-10's unlabelled split in data.path, a flat folder) have no class to vote for. A bank
    without a labelled image raises ValueError naming its key."""
    keep = split.labels >= 0
    if not bool(keep.any()):
        raise ValueError(f"data.{split.key}={split.path}: no labelled image (class sub-folders) for the kNN bank; "
                         f"set data.eval_train_path to a labelled split")
    return None if bool(keep.all()) else torch.nonzero(keep).flatten()


def shard_topk(test: Tensor, bank: Tensor, bank_labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most similar rows of this rank's bank shard for every held-out feature: (sims [M, k], labels [M, k]),
    padded with -inf / 0 when the shard has fewer than k rows. test [M, D] and bank [n, D] on one device; the
    [queries, n] similarity block stays under SIMS_BLOCK elements."""
    m, n = test.shape[0], bank.shape[0]
    sims = torch.full((m, k), float("-inf"), device=test.device)
    labels = torch.zeros(m, k, dtype=torch.int64, device=test.device)
    kk = min(k, n)
    chunk = max(1, min(4096, SIMS_BLOCK // max(1, n)))
    for i in range(0, m, chunk):
        s, j = (test[i:i + chunk] @ bank.T).topk(kk, dim=1)
        sims[i:i + chunk, :kk], labels[i:i + chunk, :kk] = s, bank_labels[j]
    return sims, labels


def vote(sims: Tensor, labels: Tensor, k: int, t: float, num_classes: int) -> Tensor:
    """Predicted class [M] from candidate neighbours (sims [M, c], labels [M, c], c >= k): the k most similar
    vote exp(cos / t) for their class (fastcl.eval.knn.knn_predict's rule)."""
    s, j = sims.topk(min(k, sims.shape[1]), dim=1)
    w = torch.where(torch.isfinite(s), (s / t).exp(), torch.zeros_like(s))
    votes = torch.zeros(sims.shape[0], num_classes, dtype=w.dtype, device=w.device)
    votes.scatter_add_(1, labels.gather(1, j), w)
    return votes.argmax(1)


class KnnMonitor:
    """kNN top-1 of the backbone on a labelled held-out split, streamed and sharded over the ranks (module
    docstring); every rank votes on the same gathered candidates, so every rank returns the same result."""

    def __init__(self, cfg, is_main: bool = True, batch_size: int = EVAL_BATCH):
        self.enabled = bool(cfg.data.eval_path) and cfg.trainer.knn_every > 0
        self.k, self.t = cfg.trainer.knn_k, cfg.trainer.knn_t
        self.cfg, self.is_main, self.batch_size = cfg, is_main, batch_size
        self.bank = self.test = self.voters = None
        self._test_feats, self._test_net = None, None
        if self.enabled:  # the held-out split first: its error is the one a user most likely caused
            self.test = open_split(cfg, "eval_path")
            self.bank = open_split(cfg, "eval_train_path" if cfg.data.eval_train_path else "path")
            self.voters = voters(self.bank)

    @property
    def test_labels(self) -> Tensor | None:
        """Labels [M] int64 of the held-out split (None when the monitor is off)."""
        return None if self.test is None else self.test.labels

    def embed(self, backbone: nn.Module, split: Split) -> Tensor:
        """L2-normalised backbone features [N, D] of `split` (CPU, row = id), the same on every rank: a
        COLLECTIVE (every rank embeds its shard, then all-gather by id)."""
        from fastcl.eval.features import embed_dataset

        return embed_dataset(backbone, self.cfg, path=split.path, batch_size=self.batch_size, max_samples=0)

    def test_features(self, backbone: nn.Module) -> Tensor:
        """Features [M, D] of the held-out split by `backbone`: those of this monitor's latest call when it was
        made with the same module (train.py scores the online probe right after the monitor, weights unchanged),
        else a fresh streamed pass (a collective)."""
        if self._test_feats is None or self._test_net is not backbone:
            self._test_feats, self._test_net = self.embed(backbone, self.test), backbone
        return self._test_feats

    def __call__(self, backbone: nn.Module) -> dict | None:
        """{"knn_top1": %, "feature_rank": effective rank of the held-out features}, the same on every rank (a
        collective: every rank calls it); None when the monitor is off.

        The bank never leaves its ranks: each rank embeds its shard, keeps it on the network's device and finds
        the k nearest of its shard for every held-out image; only those [M, k] candidates are all-gathered and
        merged (the global k nearest are among them), then voted on. Per rank that is the shard's [N / W, D] and
        the held-out [M, D] features, and the vote runs where the network runs (on the GPU at ImageNet scale)."""
        from fastcl.eval.diagnostics import effective_rank
        from fastcl.eval.features import embed_dataset

        if not self.enabled:
            return None
        bank, ids = embed_dataset(backbone, self.cfg, path=self.bank.path, batch_size=self.batch_size,
                                  max_samples=0, gather=False)
        labels = self.bank.labels[ids].to(bank.device)
        if self.voters is not None:  # unlabelled bank images (flat folders, STL-10's unlabelled split) do not vote
            keep = labels >= 0
            bank, labels = bank[keep], labels[keep]
        self._test_feats, self._test_net = self.embed(backbone, self.test), backbone
        test = self._test_feats.to(bank.device)
        sims, cand = shard_topk(test, bank, labels, self.k)
        sims, cand = dist.gather(sims[None]), dist.gather(cand[None])  # [W, M, k] each
        sims, cand = sims.permute(1, 0, 2).flatten(1), cand.permute(1, 0, 2).flatten(1)  # [M, W k]
        num_classes = int(max(self.bank.labels.max(), self.test.labels.max())) + 1
        pred = vote(sims, cand, self.k, self.t, num_classes).cpu()
        out = {"knn_top1": float((pred == self.test.labels).float().mean() * 100),
               "feature_rank": effective_rank(self._test_feats)}
        return out
