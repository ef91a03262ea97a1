"""Online linear probe: READS LABELS (like method=oracle), so it is off by default (`trainer.online_probe`).

A linear classifier trained during pretraining, as solo-learn / lightly / stable-pretraining users expect beside
the kNN monitor and the effective rank: after every training step it takes one SGD step (momentum 0.9,
`trainer.online_probe_lr`, cross-entropy) on the L2-normalised backbone features of view 0 of the batch's
LABELLED samples (label >= 0; STL-10's unlabelled images are skipped), and whenever the kNN monitor runs its top-1
on the monitor's held-out split (`data.eval_path`, eval transform) is logged next to `knn_top1` as `probe_top1`.

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
        n_cls = int(torch.as_tensor(labels).max()) + 1
        if knn.data is not None:
            n_cls = max(n_cls, int(knn.data[1][1].max()) + 1)
        n_cls = int(dist.broadcast_object(n_cls))
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
        """{"probe_top1": %} on the kNN monitor's held-out split (rank 0; same value on every rank)."""
        out = None
        if knn.data is not None:
            from fastcl.eval.knn import extract_features

            _, (xte, yte, _) = knn.data
            device = next(backbone.parameters()).device
            feats = extract_features(backbone, xte)  # L2-normalised, eval mode, CPU
            pred = self.head(feats.to(device)).argmax(1).cpu()
            out = {"probe_top1": float((pred == yte).float().mean() * 100.0)}
        return dist.broadcast_object(out)
