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


def knn_scores(bank: Tensor, bank_labels: Tensor, test: Tensor, test_labels: Tensor, k: int, t: float) -> dict:
    """{"knn_top1": %, "feature_rank": effective rank of the held-out features} of features bank [N, D] and
    test [M, D] (L2-normalised, CPU). The [queries, N] similarity block stays under SIMS_BLOCK elements."""
    from fastcl.eval.diagnostics import effective_rank
    from fastcl.eval.knn import knn_top1

    chunk = max(1, min(1024, SIMS_BLOCK // max(1, bank.shape[0])))
    return {"knn_top1": knn_top1(bank, bank_labels, test, test_labels, k, t, chunk),
            "feature_rank": effective_rank(test)}


class KnnMonitor:
    """kNN top-1 of the backbone on a labelled held-out split, streamed and sharded over the ranks (module
    docstring); rank `is_main` computes the vote, the result is broadcast."""

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
        collective: every rank calls it); None when the monitor is off."""
        if not self.enabled:
            return None
        bank, bank_labels = self.embed(backbone, self.bank), self.bank.labels
        if self.voters is not None:
            bank, bank_labels = bank[self.voters], bank_labels[self.voters]
        self._test_feats, self._test_net = self.embed(backbone, self.test), backbone
        out = None
        if self.is_main:
            out = knn_scores(bank, bank_labels, self._test_feats, self.test.labels, self.k, self.t)
        return dist.broadcast_object(out)
