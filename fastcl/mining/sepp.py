"""Mine SePP's semantic positive pairs from a frozen fastcl checkpoint.

    python -m fastcl.mining.sepp --checkpoint runs/cifar10_mocov2 --data data/extracted/cifar10-jpeg/train \
        --out data/sepp_cifar10.npz --k 5 --threshold 0.5

Embeds every un-augmented training image (eval transform) with the checkpoint's BACKBONE (pooled features,
L2-normalised), runs an exact faiss inner-product kNN (--ivf-nlist / --pca-dim for ImageNet scale), keeps at
most k neighbours per image with cosine >= threshold, never the image itself, and writes the table (.npz).
Ids are the scan_folder order, i.e. the training ids of every backend reading the same folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fastcl.checkpoint import CheckpointReadError, load_encoder
from fastcl.eval.features import embed_dataset
from fastcl.mining.miner import NeighbourMiner


def mine(checkpoint: str, data: str, out: str, k: int = 5, threshold: float = 0.5, batch_size: int = 256,
         ivf_nlist: int = 0, pca_dim: int = 0, labels_for_report: bool = True) -> dict:
    enc, cfg = load_encoder(checkpoint, "teacher" if _has_teacher(checkpoint) else "student")
    cfg.data.backend, cfg.data.path, cfg.data.max_samples = "torch", data, 0
    t0 = time.time()
    emb = embed_dataset(enc.backbone, cfg, path=data, batch_size=batch_size, progress=True)
    miner = NeighbourMiner(emb.shape[0], k, threshold, ivf_nlist=ivf_nlist, pca_dim=pca_dim)
    miner.mine(emb)
    miner.save(out)
    kept = (miner.nbr_ids >= 0).sum(1).float()
    report = {"out": out, "images": emb.shape[0], "dim": emb.shape[1], "k": k, "threshold": threshold,
              "pairs": int(kept.sum()), "images_with_partner": float((kept > 0).float().mean()),
              "seconds": round(time.time() - t0, 2)}
    if labels_for_report:  # diagnostic only: the share of mined pairs that share the true class
        from fastcl.mining.knn import pair_precision
        from fastcl.pipelines.folder import cfg_classes, scan_folder
        import torch
        labels = torch.tensor(scan_folder(data, classes=cfg_classes(cfg)).labels)
        if bool((labels >= 0).all()):
            report["pair_precision"] = float(pair_precision(miner.nbr_ids, labels))
    return report


def _has_teacher(checkpoint: str) -> bool:
    try:
        load_encoder(checkpoint, "teacher")
        return True
    except CheckpointReadError:  # bad-input fix: a damaged teacher is an error, not "no teacher"
        raise
    except ValueError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="fastcl run directory or checkpoint directory")
    ap.add_argument("--data", required=True, help="training image folder (the same one training reads)")
    ap.add_argument("--out", required=True, help="output .npz neighbour table")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--ivf-nlist", type=int, default=0, help=">0: approximate IVF search (ImageNet scale)")
    ap.add_argument("--pca-dim", type=int, default=0, help=">0: PCA-reduce features before the search")
    a = ap.parse_args(argv)
    # bad-input fix (tests/test_bad_input.py): check values before the (long) embedding pass; --batch-size 0 was
    # a ZeroDivisionError traceback and --threshold 5 silently wrote an empty table
    out_dir = os.path.dirname(os.path.abspath(a.out))
    for bad, msg in ((a.k < 1, f"--k must be >= 1, got {a.k}"),
                     (not -1 <= a.threshold <= 1, f"--threshold is a cosine in [-1, 1], got {a.threshold}"),
                     (a.batch_size < 1, f"--batch-size must be >= 1, got {a.batch_size}"),
                     (a.ivf_nlist < 0 or a.pca_dim < 0, "--ivf-nlist and --pca-dim must be >= 0"),
                     (not os.path.isdir(out_dir), f"--out {a.out}: directory {out_dir} does not exist")):
        if bad:
            print(f"fastcl.mining.sepp: error: {msg}", file=sys.stderr)
            return 2
    try:
        report = mine(a.checkpoint, a.data, a.out, a.k, a.threshold, a.batch_size, a.ivf_nlist, a.pca_dim)
    except (FileNotFoundError, ValueError) as e:
        print(f"fastcl.mining.sepp: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
