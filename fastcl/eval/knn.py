"""Weighted kNN classifier on cosine similarity (InstDisc / DINO). Evaluation: reads labels, as does its user
during training, the kNN monitor (fastcl.eval.monitor)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
             k: int = 200, t: float = 0.1, chunk: int = 1024) -> float:
    """Top-1 accuracy in percent of test_feats [M, D] against the bank train_feats [N, D] (`knn_predict`)."""
    c = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_feats, train_labels, test_feats, k, t, c, chunk).argmax(1)
    return float((pred == test_labels).float().mean() * 100)


def main(argv=None) -> int:
    """`python -m fastcl.eval.knn --checkpoint RUN --data TRAIN --val VAL [--k 20 200] [--t 0.1]`.

    Weighted kNN (InstDisc / DINO: each of the k nearest train features votes exp(cos / t) for its class) of
    the val features against the train features, both from the shared feature cache (fastcl.eval.linear).
    Runs on the CPU: the vote matrix of `knn_predict` lives there; the bank is scanned in chunks of test rows.
    """
    import argparse
    import sys

    from fastcl.eval.linear import add_common_args, aligned_labels, checkpoint_context, load_pair, topk_accuracy, \
        write_result

    ap = argparse.ArgumentParser(prog="python -m fastcl.eval.knn", description=main.__doc__.split("\n")[2].strip())
    add_common_args(ap)
    ap.add_argument("--k", type=int, nargs="+", default=[20, 200], help="neighbour counts")
    ap.add_argument("--t", type=float, default=0.1, help="temperature of the exp(cos / t) votes")
    args = ap.parse_args(argv)
    if min(args.k) < 1 or args.t <= 0:
        ap.error(f"--k must be >= 1 and --t > 0 (got k={args.k}, t={args.t})")
    train, val, hits = load_pair(args)
    y_train, y_val, classes = aligned_labels(train, val)
    bank, queries = F.normalize(train.feats.float(), dim=1), F.normalize(val.feats.float(), dim=1)
    # keep the [chunk, N] similarity block near 256 MB whatever the bank size
    chunk = max(1, min(1024, (64 << 20) // max(1, bank.shape[0])))
    top1, top5 = {}, {}
    for k in args.k:
        acc = topk_accuracy(knn_predict(bank, y_train, queries, k, args.t, len(classes), chunk), y_val)
        top1[str(k)], top5[str(k)] = acc["top1"], acc["top5"]
    ck, run_dir, _ = checkpoint_context(args.checkpoint)
    result = {"command": "knn", "checkpoint": ck, "run_dir": run_dir, "which": args.which, "train_path": train.root,
              "val_path": val.root, "n_train": len(train.rel_paths), "n_val": len(val.rel_paths),
              "num_classes": len(classes), "feat_dim": int(train.feats.shape[1]), "t": args.t, "k": list(args.k),
              "top1": top1, "top5": top5, "cache_hit": hits,
              "features": "precomputed once with the eval transform (no augmentation), L2-normalised"}
    write_result(result, args.out, f"knn_{args.which}.json")
    return 0


if __name__ == "__main__":
    from fastcl.eval.linear import run_cli

    raise SystemExit(run_cli(main))
