"""Embedding passes over a whole dataset with the eval transform (IFND source=pass, SePP mining, probes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def embed_dataset(net: nn.Module, cfg, loader=None, path: str | None = None, batch_size: int = 256,
                  normalize: bool = True, progress: bool = False) -> Tensor:
    """Features [N, D] (CPU, row = global sample id) of every training image, un-augmented.

    Image folders go through `eval_batches` (resize + center crop, ids in scan_folder order = the training ids);
    the synthetic backend embeds its fixed images. `net` runs in eval mode (BN running statistics).
    """
    from tqdm import tqdm

    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out: Tensor | None = None

    def put(feats: Tensor, ids: Tensor, n: int) -> None:
        nonlocal out
        feats = F.normalize(feats.float(), dim=1) if normalize else feats.float()
        if out is None:
            out = torch.zeros(n, feats.shape[1])
        out[ids.cpu()] = feats.cpu()

    if cfg.data.backend == "synthetic":
        from fastcl.pipelines.augment import normalize as norm_img

        n = loader.num_samples
        for s in range(0, n, batch_size):
            ids = torch.arange(s, min(s + batch_size, n), device=device)
            x = norm_img(loader.images(ids, cfg.data.aug.eval_size), cfg.data.aug.mean, cfg.data.aug.std)
            put(net(x), ids, n)
    else:
        from fastcl.pipelines.eval_data import eval_batches
        from fastcl.pipelines.folder import cfg_classes, scan_folder

        root = path or cfg.data.path
        classes = cfg_classes(cfg)  # data.classes: the training ids of a class subset
        n = len(scan_folder(root, cfg.data.max_samples, classes).paths)
        it = eval_batches(root, cfg.data.aug, batch_size, workers=cfg.data.workers, max_samples=cfg.data.max_samples,
                          classes=classes)
        for x, _, ids in tqdm(it, total=-(-n // batch_size), disable=not progress, desc="embedding"):
            put(net(x.to(device)), ids, n)
    net.train(was_training)
    return out
