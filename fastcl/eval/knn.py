"""Weighted kNN classifier on cosine similarity (InstDisc / DINO monitor). Labels are read only here."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def extract_features(net: nn.Module, images: Tensor, batch_size: int = 512, device=None) -> Tensor:
    """Backbone features of a CPU image tensor [N,3,S,S], L2-normalised, returned on CPU [N, D]."""
    was_training = net.training
    net.eval()
    device = device or next(net.parameters()).device
    out = [F.normalize(net(images[i:i + batch_size].to(device)).float(), dim=1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    net.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int = 200, t: float = 0.1,
                num_classes: int | None = None, chunk: int = 1024) -> Tensor:
    """Class scores [M, C] of test_feats [M,D] against the bank train_feats [N,D] (both normalised).

    Each of the k nearest neighbours votes exp(cos / t) for its class.
    """
    c = int(num_classes or int(train_labels.max()) + 1)
    k = min(k, train_feats.shape[0])
    scores = []
    for i in range(0, test_feats.shape[0], chunk):
        sims = test_feats[i:i + chunk] @ train_feats.T  # [m, N]
        top_s, top_i = sims.topk(k, dim=1)
        w = (top_s / t).exp()
        votes = torch.zeros(sims.shape[0], c, dtype=w.dtype)
        votes.scatter_add_(1, train_labels[top_i], w)
        scores.append(votes)
    return torch.cat(scores)


def knn_top1(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
             k: int = 200, t: float = 0.1) -> float:
    """Top-1 accuracy in percent."""
    c = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_feats, train_labels, test_feats, k, t, c).argmax(1)
    return float((pred == test_labels).float().mean() * 100)
