"""Online linear probe: READS LABELS (like method=oracle), so it is off by default (`trainer.online_probe`).

A linear classifier trained during pretraining, as solo-learn / lightly / stable-pretraining users expect beside
the kNN monitor and the effective rank: after every training step it takes one SGD step (momentum 0.9,
`trainer.online_probe_lr`, cross-entropy) on the L2-normalised backbone features of view 0 of the batch's
LABELLED samples (label >= 0; STL-10's unlabelled images are skipped), and whenever the kNN monitor runs its top-1
on the monitor's held-out split (`data.eval_path`, eval transform; the features the monitor just embedded,
`KnnMonitor.test_features`) is logged next to `knn_top1` as `probe_top1`.

It cannot change the pretraining trajectory: the features come from an extra forward pass of the backbone in
eval mode under no_grad (no gradient reaches the backbone, BN running statistics are not updated, no random draw:
the classifier starts at zero), and the probe's own optimizer holds only its own parameters. A test checks that
the backbone's weights are bit-identical with the probe on and off. Cost: one no-grad backbone forward of one view
per step. Each rank trains its own copy on its shard's batches; rank 0's is evaluated and its result broadcast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import dist


class OnlineProbe:
    def __init__(self, feat_dim: int, num_classes: int, lr: float, device):
        self.head = nn.Linear(feat_dim, num_classes).to(device)
        nn.init.zeros_(self.head.weight)  # no draw from the global RNG: the training run's stream is untouched
        nn.init.zeros_(self.head.bias)
        self.opt = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=0.9)
        self.num_classes = num_classes

    @classmethod
    def build(cls, cfg, loader, knn, backbone) -> "OnlineProbe | None":
        """The probe when `trainer.online_probe` is on, else None. Needs the kNN monitor's held-out split and a
        labelled training set (ValueError otherwise)."""
        if not cfg.trainer.get("online_probe", False):
            return None
        if not knn.enabled:
            raise ValueError("trainer.online_probe needs the kNN monitor's held-out split: set data.eval_path and "
                             "trainer.knn_every > 0")
        labels = getattr(loader, "labels", None)
        if labels is None or not bool((torch.as_tensor(labels) >= 0).any()):
            raise ValueError("trainer.online_probe needs labelled training images; this training set has none")
        n_cls = max(int(torch.as_tensor(labels).max()), int(knn.test_labels.max())) + 1
        n_cls = int(dist.broadcast_object(n_cls))  # rank 0's count: every rank builds the same head
        device = next(backbone.parameters()).device
        with torch.no_grad():
            was = backbone.training
            backbone.eval()
            size = int(cfg.data.aug.eval_size)
            dim = backbone(torch.zeros(1, 3, size, size, device=device)).shape[1]
            backbone.train(was)
        return cls(dim, n_cls, float(cfg.trainer.online_probe_lr), device)

    @staticmethod
    @torch.no_grad()
    def _features(backbone: nn.Module, x: Tensor) -> Tensor:
        was = backbone.training
        backbone.eval()
        try:
            return F.normalize(backbone(x).float(), dim=1)
        finally:
            backbone.train(was)

    def step(self, backbone: nn.Module, batch) -> None:
        """One SGD step on the labelled samples of a training batch (reads batch.label: the probe only)."""
        label = batch.label
        if label is None:
            return
        keep = label >= 0
        x = batch.views[0][keep]
        if x.shape[0] == 0:
            return
        feats = self._features(backbone, x.float() if x.dtype != torch.float32 else x)
        loss = F.cross_entropy(self.head(feats), label[keep])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, knn) -> dict:
        """{"probe_top1": %} on the kNN monitor's held-out split, scored by rank 0's head (same value on every
        rank; a collective). The features [M, D] (L2-normalised, eval mode) are `knn.test_features(backbone)`:
        those the monitor embedded in its call just before, so the probe costs no second pass over the split."""
        feats = knn.test_features(backbone)
        out = None
        if dist.rank() == 0:
            pred = self.head(feats.to(self.head.weight.device)).argmax(1).cpu()
            out = {"probe_top1": float((pred == knn.test_labels).float().mean() * 100.0)}
        return dist.broadcast_object(out)
