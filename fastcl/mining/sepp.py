"""Mine SePP's semantic positive pairs from a frozen fastcl checkpoint.

    python -m fastcl.mining.sepp --checkpoint runs/cifar10_mocov2 --data data/extracted/cifar10-jpeg/train \
        --out data/sepp_cifar10.npz --k 5 --threshold 0.5 [--features centered|backbone|projector]
        [--target-precision 0.8 --calibrate-images 5000]

Embeds every un-augmented training image (eval transform) with the checkpoint's encoder, runs an exact faiss
inner-product kNN (--ivf-nlist / --pca-dim for ImageNet scale), keeps at most k neighbours per image with
cosine >= threshold, never the image itself, and writes the table (.npz, which records the feature space).
Ids are the scan_folder order, i.e. the training ids of every backend reading the same folder.

Feature space (--features, default `centered`, our choice): the pooled backbone features with the dataset mean
removed (knn.center_features). The raw pooled features come after a ReLU, so every cosine between them is >= 0
and most pairs sit well above 0.5: a 0.5 threshold there (`backbone`, the old behaviour) filters little and the
table is nearly a plain top-k. Centred, an unrelated pair has cosine ~0, so the threshold means "much closer than
average". `projector` uses the projector output (also signed). --target-precision instead calibrates the
threshold on a labelled subset (the first --calibrate-images images): the lowest cosine whose pairs reach that
same-class share (knn.threshold_for_precision); labels choose that one number, training never reads them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fastcl.checkpoint import open_run
from fastcl.eval.features import embed_dataset
from fastcl.mining.miner import NeighbourMiner


FEATURES = ("centered", "backbone", "projector")


def mine(checkpoint: str, data: str, out: str, k: int = 5, threshold: float = 0.5, batch_size: int = 256,
         ivf_nlist: int = 0, pca_dim: int = 0, labels_for_report: bool = True, features: str = "centered",
         target_precision: float = 0.0, calibrate_images: int = 0) -> dict:
    import torch

    from fastcl.mining.knn import pair_precision, threshold_for_precision
    from fastcl.pipelines.folder import cfg_classes, scan_folder

    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    run = open_run(checkpoint)
    enc, cfg = run.encoder("teacher" if run.has("teacher") else "student"), run.cfg
    cfg.data.backend, cfg.data.path, cfg.data.max_samples = "torch", data, 0
    t0 = time.time()
    net = enc if features == "projector" else enc.backbone
    emb = embed_dataset(net, cfg, path=data, batch_size=batch_size, progress=True)
    labels = torch.tensor(scan_folder(data, classes=cfg_classes(cfg)).labels) \
        if (labels_for_report or target_precision > 0) else None
    calib = {}
    if target_precision > 0:  # mine the top-k at any cosine, then cut at the calibrated threshold
        miner = NeighbourMiner(emb.shape[0], k, -1.0, ivf_nlist=ivf_nlist, pca_dim=pca_dim, features=features)
        ids, sims = miner.mine(emb)
        n = min(calibrate_images, emb.shape[0]) if calibrate_images > 0 else emb.shape[0]
        threshold, prec, pairs = threshold_for_precision(ids, sims, labels, target_precision,
                                                         rows=torch.arange(n))
        keep = sims >= threshold
        miner.nbr_ids.masked_fill_(~keep, -1)
        miner.nbr_sims.masked_fill_(~keep, -float("inf"))
        miner.threshold = threshold
        calib = {"target_precision": target_precision, "calibrate_images": n, "calibrated_precision": prec,
                 "calibration_pairs": pairs}
    else:
        miner = NeighbourMiner(emb.shape[0], k, threshold, ivf_nlist=ivf_nlist, pca_dim=pca_dim, features=features)
        miner.mine(emb)
    miner.save(out)
    kept = (miner.nbr_ids >= 0).sum(1).float()
    report = {"out": out, "images": emb.shape[0], "dim": emb.shape[1], "features": features, "k": k,
              "threshold": miner.threshold, **calib, "pairs": int(kept.sum()),
              "images_with_partner": float((kept > 0).float().mean()), "seconds": round(time.time() - t0, 2)}
    if labels_for_report and labels is not None and bool((labels >= 0).all()):
        # diagnostic only: the share of mined pairs that share the true class
        report["pair_precision"] = float(pair_precision(miner.nbr_ids, labels))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="fastcl run directory or checkpoint directory")
    ap.add_argument("--data", required=True, help="training image folder (the same one training reads)")
    ap.add_argument("--out", required=True, help="output .npz neighbour table")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.5, help="minimum cosine in the --features space")
    ap.add_argument("--features", default="centered", choices=FEATURES,
                    help="centered: backbone features minus their mean (default; cosines can be negative); "
                         "backbone: raw pooled features (post-ReLU: every cosine >= 0); projector: projector output")
    ap.add_argument("--target-precision", type=float, default=0.0,
                    help=">0: ignore --threshold and calibrate it so that the labelled subset's pairs reach this "
                         "same-class share (reads the folder's labels)")
    ap.add_argument("--calibrate-images", type=int, default=0,
                    help="the labelled subset for --target-precision: the first N images (0: all)")
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
                     (not 0 <= a.target_precision <= 1, f"--target-precision must lie in [0, 1], got "
                                                         f"{a.target_precision}"),
                     (a.calibrate_images < 0, f"--calibrate-images must be >= 0, got {a.calibrate_images}"),
                     (a.ivf_nlist < 0 or a.pca_dim < 0, "--ivf-nlist and --pca-dim must be >= 0"),
                     (not os.path.isdir(out_dir), f"--out {a.out}: directory {out_dir} does not exist")):
        if bad:
            print(f"fastcl.mining.sepp: error: {msg}", file=sys.stderr)
            return 2
    try:
        report = mine(a.checkpoint, a.data, a.out, a.k, a.threshold, a.batch_size, a.ivf_nlist, a.pca_dim,
                      features=a.features, target_precision=a.target_precision,
                      calibrate_images=a.calibrate_images)
    except (FileNotFoundError, ValueError) as e:
        print(f"fastcl.mining.sepp: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
